"""tinker-cookbook's off-policy distillation (`distillation/train_off_policy.py`, unchanged)
against a loraloom server: `python off_policy_distill.py URL LOG_DIR MODEL_DIR`.

The base model is its own teacher: each step, its top-20 prompt logprobs over every datum become
[N, 20] `target_tokens` and `weights` for `cross_entropy`."""

import asyncio
import sys

import chz
import tinker
from transformers import AutoTokenizer

from tinker_cookbook.distillation.datasets import TeacherConfig
from tinker_cookbook.distillation.train_off_policy import Config, DatasetWithTeacher, main
from tinker_cookbook.supervised.types import SupervisedDataset, SupervisedDatasetBuilder
from tinker_cookbook.tokenizer_utils import register_tokenizer

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PAIRS = [
    ("Q: What colour is the loom? A:", " The loom is violet."),
    ("Q: Who weaves the adapters? A:", " Loraloom weaves them."),
    ("Q: Where does the thread go? A:", " Into the warp."),
    ("Q: How many shuttles? A:", " Exactly seven."),
]

url, log_dir, model_dir = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
register_tokenizer(MODEL_NAME, lambda: tokenizer)


class Pairs(SupervisedDataset):
    """Every batch holds the four question-answer pairs, trained on the answer tokens."""

    def get_batch(self, index: int) -> list[tinker.Datum]:
        data = []
        for prompt, answer in PAIRS:
            p = tokenizer(prompt).input_ids
            tokens = p + tokenizer(answer).input_ids + [tokenizer.eos_token_id]
            weights = [0.0] * (len(p) - 1) + [1.0] * (len(tokens) - len(p))
            data.append(tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                                     loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}))
        return data

    def __len__(self) -> int:
        return 3


@chz.chz
class PairsBuilder(SupervisedDatasetBuilder):
    def __call__(self):
        return Pairs(), None


config = Config(
    learning_rate=1e-4, model_name=MODEL_NAME, recipe_name="off-policy-distill",
    renderer_name="role_colon", lora_rank=8, batch_size=4, n_teacher_targets=20,
    dataset_configs=[DatasetWithTeacher(dataset_builder=PairsBuilder(),
                                        teacher_config=TeacherConfig(base_model=MODEL_NAME))],
    log_path=log_dir, base_url=url, eval_every=0, save_every=0,
)
asyncio.run(main(config))
