#!/usr/bin/env python3
"""Oracle for sampling: transformers/peft greedy generate() with the raw logits of each step.

Usage:
  sample_oracle.py greedy MODEL_DIR OUT NEW_TOKENS [ADAPTER_DIR]

Prompts are fixed random token lists (or, for a model with a tokenizer, fixed sentences).
OUT holds for prompt i: `prompt.i`, `tokens.i` (generated), `logprobs.i` (log-softmax of the
raw logits at each chosen token) and `prompt_logprobs.i` (log-prob of prompt token j given its
prefix, j >= 1). EOS does not stop generation (the Rust side uses `Stop::Never`).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import save_file


def prompts(model_dir: Path, vocab: int):
    if (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        texts = ["The capital of France is", "Once upon a time, in a small village,"]
        return [torch.tensor(tok(t).input_ids) for t in texts]
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=g) for n in (7, 3, 12)]


def main() -> None:
    from transformers import AutoModelForCausalLM

    model_dir, out, new_tokens = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if len(sys.argv) > 5:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, sys.argv[5]).eval()
    gen = model.generation_config
    gen.eos_token_id = None
    gen.pad_token_id = 0
    tensors = {}
    for i, p in enumerate(prompts(model_dir, model.config.vocab_size)):
        ids = p[None, :]
        with torch.no_grad():
            res = model.generate(ids, generation_config=gen, max_new_tokens=new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            full = model(input_ids=ids).logits[0]
        new = res.sequences[0, ids.shape[1]:]
        step_lp = torch.stack([torch.log_softmax(l[0].float(), -1)[t] for l, t in zip(res.logits, new)])
        plp = torch.log_softmax(full[:-1].float(), -1).gather(-1, p[1:, None]).squeeze(-1)
        tensors[f"prompt.{i}"] = p
        tensors[f"tokens.{i}"] = new
        tensors[f"logprobs.{i}"] = step_lp
        tensors[f"prompt_logprobs.{i}"] = plp
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))


if __name__ == "__main__":
    if sys.argv[1] != "greedy":
        raise SystemExit(__doc__)
    main()
