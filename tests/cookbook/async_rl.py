"""tinker-cookbook's RL trainer in async mode with its default AsyncConfig, whose loss is
`stable_reinforce`, against a loraloom server: `python async_rl.py URL LOG_DIR MODEL_DIR`.

The arithmetic environment's sums are beyond a 135M model, so the reward is any answer holding
a digit 1: groups then differ and every step has advantages to train on."""

import asyncio
import sys

from transformers import AutoTokenizer

from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder, ArithmeticEnv
from tinker_cookbook.rl.train import AsyncConfig, Config, main
from tinker_cookbook.tokenizer_utils import register_tokenizer

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

url, log_dir, model_dir = sys.argv[1:4]
register_tokenizer(MODEL_NAME, lambda: AutoTokenizer.from_pretrained(model_dir))
ArithmeticEnv.check_format = lambda self, text: True
ArithmeticEnv.check_answer = lambda self, text: "1" in text

dataset = ArithmeticDatasetBuilder(batch_size=4, model_name_for_tokenizer=MODEL_NAME,
                                   renderer_name="role_colon", n_batches=8, group_size=4)
config = Config(
    learning_rate=1e-4, dataset_builder=dataset, model_name=MODEL_NAME, recipe_name="async-rl",
    max_tokens=16, log_path=log_dir, base_url=url, lora_rank=8, max_steps=5,
    eval_every=0, save_every=0,
    async_config=AsyncConfig(max_steps_off_policy=2, groups_per_batch=4),
)
assert config.training_loss_fn() == "stable_reinforce"
asyncio.run(main(config))
