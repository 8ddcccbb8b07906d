"""PyTorch baselines for `scripts/bench`, on the same checkpoint and machine: transformers forward,
transformers + peft forward_backward + Adam step, transformers generate. Prints JSON lines.
BENCH_DTYPE=bf16 loads the base model in bf16 (peft keeps its LoRA weights f32), as
`loraloom bench --dtype bf16` does."""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import AutoModelForCausalLM

ITERS = int(os.environ.get("BENCH_ITERS", "3"))
DTYPE = {"auto": torch.float32, "f32": torch.float32, "float32": torch.float32,
         "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[os.environ.get("BENCH_DTYPE", "auto").strip()]


def timed(fn):
    fn()
    times = []
    for _ in range(ITERS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ids(batch, length, vocab):
    return torch.tensor([[((b * 7919 + j * 104729) % (vocab - 200)) + 100 for j in range(length + 1)]
                         for b in range(batch)])


def main(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()
    vocab = model.config.vocab_size
    what = sys.argv[2].split(",") if len(sys.argv) > 2 else ["forward", "train", "decode"]
    x = ids(4, 128, vocab)
    if "forward" in what:
        with torch.no_grad():
            s = timed(lambda: model(input_ids=x[:, :-1]))
        print(json.dumps({"what": "hf_forward", "tokens_per_s": 4 * 128 / s, "seconds": s}))
    if "train" in what:
        from peft import LoraConfig, get_peft_model

        # As `loraloom bench`: every target, the MLP's only on a dense model.
        mlp = [] if model.config.model_type == "qwen3_moe" else ["gate_proj", "up_proj", "down_proj"]
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", *mlp, "lm_head"])
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE), cfg)
        peft_model.train()
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4,
                               betas=(0.9, 0.95), eps=1e-12)

        def step():
            logits = peft_model(input_ids=x[:, :-1]).logits
            lp = torch.log_softmax(logits.float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
            (-lp.sum()).backward()
            opt.step()
            opt.zero_grad()

        s = timed(step)
        print(json.dumps({"what": "peft_train_step", "tokens_per_s": 4 * 128 / s, "seconds": s}))
    if "decode" in what:
        prompt = ids(1, 15, vocab)
        gen = model.generation_config
        gen.eos_token_id = None
        gen.pad_token_id = 0
        for n in (1, 8):
            batch = prompt.repeat(n, 1)
            with torch.no_grad():
                s = timed(lambda: model.generate(batch, generation_config=gen, max_new_tokens=32, do_sample=False))
            print(json.dumps({"what": "hf_generate", "sequences": n, "tokens_per_s": n * 32 / s, "seconds": s}))


if __name__ == "__main__":
    main(sys.argv[1])
