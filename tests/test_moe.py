"""Mixture-of-experts base models (Qwen3-MoE) served end to end, driven by the official SDK.

The model is a tiny random Qwen3-MoE that transformers writes here (two sparse layers of 8
experts, top 3, around a dense one; the Hub's one-tensor-per-expert layout). Oracles: a fresh
adapter's logprobs are transformers' on the same weights. After training, the adapter the SDK's
CLI downloads continues a prompt greedily, as the server's sampler does, in two ways:
- for an adapter on attention and the unembedding, loaded by peft onto transformers' model;
- for the default adapter, which also gives each expert its own LoRA, merged into
  transformers' model by tinker-cookbook's `weights.build_hf_model`, which is how Tinker's users
  turn their adapters into models; and converted by the cookbook's `weights.build_lora_adapter`
  into the PEFT layout serving frameworks load (one LoRA per expert), applied as they apply it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tinker import types
from transformers import AutoModelForCausalLM

from conftest import DEFAULT_MODEL_DIR, ROOT, Server

MOE_NAME = "tiny/Qwen3-MoE"
NEW_TOKENS = 12
# Token ids inside the tiny model's 128-token vocabulary.
PROMPT = [5, 77, 12, 9, 101, 33, 64, 3, 90, 41]
TRAIN = [[7, 19, 88, 3, 54, 21, 66, 13, 99, 4, 45], [31, 8, 120, 17, 60, 5, 73, 26]]
KEY = "tml-anyone"


def make_tiny(tmp_path_factory, arch):
    """A tiny random `arch` checkpoint (tests/oracles/tiny_models.py) the server can load."""
    out = tmp_path_factory.mktemp(arch)
    subprocess.run([sys.executable, str(ROOT / "tests/oracles/tiny_models.py"), "make", arch, str(out)],
                   check=True)
    # The server needs a tokenizer; these tests send token ids below the model's vocabulary.
    shutil.copy(DEFAULT_MODEL_DIR / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory, "qwen3_moe")


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


def greedy(model):
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def train_and_download(server, moe_dir, tmp_path, model_name=MOE_NAME, **lora):
    """A fresh adapter's logprobs checked against transformers, 4 steps of training, then its
    sampler and the folder the CLI downloads its state to."""
    sc = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    tc = sc.create_lora_training_client(base_model=model_name, seed=5, **lora).result()
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
    env = dict(os.environ, TINKER_BASE_URL=server.url, TINKER_API_KEY=KEY)
    cli = Path(sys.executable).parent / "tinker"
    done = subprocess.run([str(cli), "checkpoint", "download", state, "--output", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [adapter_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                              stop=[])).result()
    return base, adapter_dir, res.sequences[0].tokens


def test_attention_adapter_trains_exports_and_samples_as_peft(moe_server, moe_dir, tmp_path):
    base, adapter_dir, served = train_and_download(moe_server, moe_dir, tmp_path, rank=4, train_mlp=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    want = greedy(model)
    assert served == want
    # The trained adapter moved the model: its greedy continuation is not the base model's.
    with model.disable_adapter():
        assert greedy(model) != want


def test_default_adapter_trains_the_experts_and_merges_as_the_cookbook_merges_it(moe_server, moe_dir, tmp_path):
    from tinker_cookbook import weights

    base, adapter_dir, served = train_and_download(moe_server, moe_dir, tmp_path / "download", rank=8)
    rest = tinker.RestClient(base_url=moe_server.url, api_key=KEY)
    caps = rest.get_server_capabilities().result()
    assert MOE_NAME in [m.model_name for m in caps.supported_models]
    merged_dir = tmp_path / "merged"
    weights.build_hf_model(base_model=str(moe_dir), adapter_path=str(adapter_dir),
                           output_path=str(merged_dir), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert greedy(merged) == served
    assert greedy(base) != served

    # The cookbook's conversion for serving frameworks (vLLM, SGLang): one PEFT LoRA per expert
    # and projection. Applied as such a framework applies it (each module's delta scaled by its
    # config's alpha / r), it continues the prompt as the server does.
    peft_dir = tmp_path / "peft"
    weights.build_lora_adapter(base_model=str(moe_dir), adapter_path=str(adapter_dir),
                               output_path=str(peft_dir))
    served_by_peft_layout = apply_peft_adapter(base, peft_dir)
    assert greedy(served_by_peft_layout) == served


def apply_peft_adapter(base, peft_dir):
    """`base` with the PEFT adapter in `peft_dir` added into its weights: `alpha / r · B A` per
    module (its `rank_pattern` / `alpha_pattern` entry, else the config's), experts' per-expert
    modules (`experts.3.gate_proj`) into transformers' fused expert tensors."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    lora = load_file(str(peft_dir / "adapter_model.safetensors"))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [k[len("base_model.model."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")]
    experts = 0
    for module in modules:
        a = lora[f"base_model.model.{module}.lora_A.weight"]
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        leaf = module.rsplit(".", 1)[-1]
        r = (config.get("rank_pattern") or {}).get(leaf, config["r"])
        alpha = (config.get("alpha_pattern") or {}).get(leaf, config["lora_alpha"])
        delta = alpha / r * (b @ a)
        expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj", module)
        if expert is None:
            state[f"{module}.weight"] += delta
            continue
        experts += 1
        prefix, e, projection = expert.group(1), int(expert.group(2)), expert.group(3)
        if projection == "down":
            state[f"{prefix}.down_proj"][e] += delta
        else:
            gate_up = state[f"{prefix}.gate_up_proj"][e]
            inter = gate_up.shape[0] // 2
            rows = slice(0, inter) if projection == "gate" else slice(inter, 2 * inter)
            gate_up[rows] += delta
    # Two sparse layers of 8 experts, gate, up and down each.
    assert experts == 2 * 8 * 3, experts
    model = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32).eval()
    model.load_state_dict(state)
    return model
