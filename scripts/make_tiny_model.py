"""A random-weight Llama of a few layers of width 64, for the CPU proxy of a GPU in `make bench`.

On such a model, as on a GPU, the cost of a step is dominated by the number of operations, not
their arithmetic, so a loop over adapters or runs shows up. Deterministic (seeded); no download:
the config is written here and the tokenizer copied from the default model.

usage: python scripts/make_tiny_model.py DEST_DIR [DEFAULT_MODEL_DIR]
"""

import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    dest = sys.argv[1]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "data/models/SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(dest, "model.safetensors")):
        return
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    os.makedirs(dest, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    shutil.copy(os.path.join(default, "tokenizer.json"), os.path.join(dest, "tokenizer.json"))


if __name__ == "__main__":
    main()
