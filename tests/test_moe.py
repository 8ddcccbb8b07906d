"""A mixture-of-experts base model (Qwen3-MoE) served end to end, driven by the official SDK.

The model is a tiny random Qwen3-MoE that transformers writes here (two sparse layers of 8
experts, top 3, around a dense one; the Hub's one-tensor-per-expert layout). Oracles: a fresh
adapter's logprobs are transformers' on the same weights, and after training, the adapter the
SDK's CLI downloads, loaded by peft onto transformers' model, greedily continues a prompt as the
server's sampler does. Adapting the experts (`train_mlp`) is refused by name until loraloom
implements it, rather than silently training a smaller adapter.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from conftest import DEFAULT_MODEL_DIR, ROOT, Server

MOE_NAME = "tiny/Qwen3-MoE"
NEW_TOKENS = 12
# Token ids inside the tiny model's 128-token vocabulary.
PROMPT = [5, 77, 12, 9, 101, 33, 64, 3, 90, 41]
TRAIN = [[7, 19, 88, 3, 54, 21, 66, 13, 99, 4, 45], [31, 8, 120, 17, 60, 5, 73, 26]]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3-moe")
    subprocess.run([sys.executable, str(ROOT / "tests/oracles/tiny_models.py"), "make", "qwen3_moe", str(out)],
                   check=True)
    # The server needs a tokenizer; these tests send token ids below the model's vocabulary.
    shutil.copy(DEFAULT_MODEL_DIR / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory, moe_dir):
    srv = Server(tmp_path_factory.mktemp("moe-data"), model=(moe_dir, MOE_NAME))
    yield srv
    srv.stop()


def datum(tokens):
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def transformers_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_adapting_the_experts_is_refused_by_name(moe_server):
    sc = tinker.ServiceClient(base_url=moe_server.url, api_key="tml-anyone")
    with pytest.raises(tinker.BadRequestError) as refused:
        sc.create_lora_training_client(base_model=MOE_NAME, rank=4).result()
    assert "train_mlp" in str(refused.value), refused.value
    # The server keeps serving.
    rest = tinker.RestClient(base_url=moe_server.url, api_key="tml-anyone")
    caps = rest.get_server_capabilities().result()
    assert MOE_NAME in [m.model_name for m in caps.supported_models]


def test_attention_adapter_trains_exports_and_samples_as_peft(moe_server, moe_dir, tmp_path):
    sc = tinker.ServiceClient(base_url=moe_server.url, api_key="tml-anyone")
    tc = sc.create_lora_training_client(base_model=MOE_NAME, rank=4, seed=5, train_mlp=False).result()
    base = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()

    # A fresh adapter (B = 0) leaves the model as transformers computes it. f32 on both sides,
    # sums in different orders: 1e-4.
    out = tc.forward([datum(t) for t in TRAIN], "cross_entropy").result()
    for tokens, o in zip(TRAIN, out.loss_fn_outputs):
        got = torch.tensor(o["logprobs"].data)
        want = transformers_logprobs(base, tokens)
        assert torch.allclose(got, want, atol=1e-4), (got, want)

    losses = []
    for _ in range(4):
        fb = tc.forward_backward([datum(t) for t in TRAIN], "cross_entropy").result()
        losses.append(fb.metrics["loss:sum"])
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    assert losses[-1] < losses[0], losses

    state = tc.save_state("moe-final").result().path
    sampler = tc.save_weights_and_get_sampling_client().result()
    env = dict(os.environ, TINKER_BASE_URL=moe_server.url, TINKER_API_KEY="tml-anyone")
    cli = Path(sys.executable).parent / "tinker"
    done = subprocess.run([str(cli), "checkpoint", "download", state, "--output", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [adapter_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]

    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                              stop=[])).result()
    assert res.sequences[0].tokens == want
    # The trained adapter moved the model: its greedy continuation is not the base model's.
    with torch.no_grad(), model.disable_adapter():
        plain = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert plain != want
