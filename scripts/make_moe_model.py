"""Random-weight mixture-of-experts checkpoints for the MoE benchmarks (Qwen3-MoE, and GPT-OSS with
its experts in MXFP4 as OpenAI ships them). Deterministic (seeded); no download: the config is
written here and the tokenizer copied from TOKENIZER_DIR (default: the default model's folder).

usage: python scripts/make_moe_model.py DEST_DIR [TOKENIZER_DIR] [SHAPE]
  SHAPE bench (default): 4 layers of width 256, each a mixture of 32 experts (width 128) of
        which a token uses 4; vocabulary 2048; f32 (`scripts/moe_bench`, CPU)
  SHAPE a3b: MOE_LAYERS (default 4) layers of Qwen3-30B-A3B's shape (width 2048, 128 experts of
        width 768, 8 per token, 32/4 heads of 128); vocabulary 49152 (the SmolLM2 tokenizer's);
        bf16, made on the GPU when there is one (`scripts/gpu_moe.sh`)
  SHAPE oss_bench: GPT-OSS, 4 layers of width 256, 32 experts (width 256) of which a token uses 4,
        experts in MXFP4; vocabulary 2048; f32 (`loraloom bench --mxfp4 ...`, CPU)
  SHAPE oss20b: MOE_LAYERS (default 4) layers of gpt-oss-20b's shape (width 2880, 32 experts of
        width 2880, 4 per token, 64/8 heads of 64), experts in MXFP4; vocabulary 49152; bf16,
        made on the GPU when there is one (`scripts/gpu_moe.sh`)
"""

import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import torch
from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

# save_mxfp4: beside this file in a GPU kit, else the tests' oracle.
_scripts = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_scripts, os.path.join(os.path.dirname(_scripts), "tests", "oracles")]
from tiny_models import save_mxfp4  # noqa: E402

SHAPES = {
    "bench": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=32,
                  num_experts_per_tok=4, moe_intermediate_size=128),
    "a3b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=6144,
                num_hidden_layers=int(os.environ.get("MOE_LAYERS", "4")), num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                moe_intermediate_size=768),
}


OSS_SHAPES = {
    "oss_bench": dict(vocab_size=2048, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_local_experts=32,
                      num_experts_per_tok=4, sliding_window=128),
    "oss20b": dict(vocab_size=49152, hidden_size=2880, intermediate_size=2880,
                   num_hidden_layers=int(os.environ.get("MOE_LAYERS", "4")), num_attention_heads=64,
                   num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                   sliding_window=128),
}


def make_gpt_oss(dest: str, shape: str) -> GptOssForCausalLM:
    """A random GPT-OSS of `shape` written to `dest` with its experts in MXFP4."""
    torch.manual_seed(0)
    config = GptOssConfig(**OSS_SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2)
    config.architectures = ["GptOssForCausalLM"]
    big = shape != "oss_bench"
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = GptOssForCausalLM(config).to(torch.bfloat16 if big else torch.float32)
    save_mxfp4(model, Path(dest))
    return model


def main() -> None:
    dest = sys.argv[1]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tokenizer = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "data/models/SmolLM2-135M-Instruct")
    shape = sys.argv[3] if len(sys.argv) > 3 else "bench"
    if os.path.exists(os.path.join(dest, "config.json")):
        return
    if shape in OSS_SHAPES:
        model = make_gpt_oss(dest, shape)
        shutil.copy(os.path.join(tokenizer, "tokenizer.json"), os.path.join(dest, "tokenizer.json"))
        print(f"{dest}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
              "experts in MXFP4")
        return
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        **SHAPES[shape], max_position_embeddings=8192, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    big = shape != "bench"
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    with torch.device(device):  # a big model's random init on the GPU: seconds, not minutes
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16 if big else torch.float32)
    os.makedirs(dest, exist_ok=True)
    # save_pretrained writes the Hub's layout (one tensor per expert and projection).
    model.save_pretrained(dest, safe_serialization=True)
    shutil.copy(os.path.join(tokenizer, "tokenizer.json"), os.path.join(dest, "tokenizer.json"))
    print(f"{dest}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {device}")


if __name__ == "__main__":
    main()
