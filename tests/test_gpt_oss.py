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
import tinker
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import Server
from test_moe import KEY, greedy, make_tiny, train_and_download

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
