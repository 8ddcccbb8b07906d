"""GPT-OSS base models served end to end, driven by the official SDK.

The model is a tiny random GPT-OSS that transformers writes here: a sliding-window layer then a
full one, attention with biases and a sink logit per head, every layer's MLP 8 biased experts
(top 2) with GPT-OSS's clamped SwiGLU, their gate and up columns interleaved in the checkpoint.
Oracles, as for Qwen3-MoE (`test_moe.py`): a fresh adapter's logprobs are transformers' on the
same weights; after training, the downloaded adapter continues a prompt greedily as the
server's sampler does, loaded by peft (attention adapter) or merged into transformers' model by
tinker-cookbook's `weights.build_hf_model` (the default adapter, experts included: the cookbook
interleaves the experts' gate and up deltas as GPT-OSS's fused tensor lays them out).
"""

import pytest
import requests
import tinker
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import Server
from test_moe import KEY, TRAIN, datum, greedy, make_tiny, train_and_download

NAME = "tiny/GPT-OSS"


@pytest.fixture(scope="module")
def oss_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory, "gpt_oss")


@pytest.fixture(scope="module")
def oss_server(tmp_path_factory, oss_dir):
    srv = Server(tmp_path_factory.mktemp("gpt-oss-data"), model=(oss_dir, NAME))
    yield srv
    srv.stop()


def test_attention_adapter_trains_exports_and_samples_as_peft(oss_server, oss_dir, tmp_path):
    base, adapter_dir, served = train_and_download(oss_server, oss_dir, tmp_path, model_name=NAME,
                                                   rank=4, train_mlp=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    want = greedy(model)
    assert served == want
    with model.disable_adapter():
        assert greedy(model) != want


def test_default_adapter_trains_the_experts_and_merges_as_the_cookbook_merges_it(oss_server, oss_dir, tmp_path):
    from tinker_cookbook import weights

    base, adapter_dir, served = train_and_download(oss_server, oss_dir, tmp_path / "download",
                                                   model_name=NAME, rank=8)
    rest = tinker.RestClient(base_url=oss_server.url, api_key=KEY)
    caps = rest.get_server_capabilities().result()
    assert NAME in [m.model_name for m in caps.supported_models]
    merged_dir = tmp_path / "merged"
    weights.build_hf_model(base_model=str(oss_dir), adapter_path=str(adapter_dir),
                           output_path=str(merged_dir), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert greedy(merged) == served
    assert greedy(base) != served


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory, "gpt_oss_mxfp4")


def test_mxfp4_experts_kept_packed_train_and_sample_as_transformers_dequantized(tmp_path_factory, mxfp4_dir,
                                                                               tmp_path):
    """OpenAI ships GPT-OSS's experts in MXFP4; with `--mxfp4 packed` they stay so on the server
    (each layer dequantizes them as it runs). transformers dequantizes them at load: a fresh
    adapter's logprobs, training and the downloaded adapter's greedy continuation under peft
    all agree with it."""
    srv = Server(tmp_path_factory.mktemp("gpt-oss-mxfp4-data"), "--mxfp4", "packed",
                 model=(mxfp4_dir, NAME))
    try:
        stats = requests.get(srv.url + "/api/model-stats", headers={"X-API-Key": KEY}).json()
        assert stats["summary"].endswith("experts in MXFP4"), stats["summary"]
        # Two layers of 8 experts' [64, 64] gate/up and [64, 32] down: 4 bytes a weight in
        # f32, 17/32 of a byte packed.
        experts = 2 * 8 * (64 * 64 + 64 * 32)
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(mxfp4_dir).parameters())
        assert stats["weight_bytes"] == (parameters - experts) * 4 + experts * 17 // 32
        base, adapter_dir, served = train_and_download(srv, mxfp4_dir, tmp_path, model_name=NAME,
                                                       rank=4, train_mlp=False)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        assert served == greedy(model)
        # The experts' own adapters train on packed experts too.
        sc = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
        tc = sc.create_lora_training_client(base_model=NAME, rank=4, seed=3).result()
        losses = []
        for _ in range(3):
            fb = tc.forward_backward([datum(t) for t in TRAIN], "cross_entropy").result()
            losses.append(fb.metrics["loss:sum"])
            tc.optim_step(tinker.types.AdamParams(learning_rate=2e-2)).result()
        assert losses[-1] < losses[0], losses
    finally:
        srv.stop()
