"""A random-weight Qwen3-MoE for `scripts/moe_bench`: 4 layers of width 256, each a mixture of 32
experts (width 128) of which a token uses 4, attention as Qwen3's. Deterministic (seeded); no
download: the config is written here and the tokenizer copied from the default model.

usage: python scripts/make_moe_model.py DEST_DIR [DEFAULT_MODEL_DIR]
"""

import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


def main() -> None:
    dest = sys.argv[1]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "data/models/SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(dest, "model.safetensors")):
        return
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    model = Qwen3MoeForCausalLM(config)
    os.makedirs(dest, exist_ok=True)
    # save_pretrained writes the Hub's layout (one tensor per expert and projection).
    model.save_pretrained(dest, safe_serialization=True)
    shutil.copy(os.path.join(default, "tokenizer.json"), os.path.join(dest, "tokenizer.json"))


if __name__ == "__main__":
    main()
