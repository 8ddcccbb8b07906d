#!/usr/bin/env python3
"""Oracles for LoRA training: peft logits/gradients, the Tinker losses, Adam.

Usage:
  lora_oracle.py peft-grads TINY_DIR OUT_DIR [TARGETS]
                                                  peft adapter (given random A/B) + batch, loss, grads
                                                  (f32, and bf16.* with the base in bf16); TARGETS:
                                                  comma-separated modules (default all seven + lm_head)
  lora_oracle.py peft-logits TINY_DIR ADAPTER OUT logits of TINY_DIR + a saved adapter, via peft
  lora_oracle.py peft-topk TINY_DIR OUT_DIR       peft-grads' adapter and inputs, K = 5 targets per
                                                  position (top-K distillation): logprobs, loss, grads
  lora_oracle.py losses OUT                       each loss and d(loss)/d(logits) by direct formulas
  lora_oracle.py adam OUT                         5 steps of torch.optim.Adam/AdamW (+ clipping)
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import load_file, save_file

SEED = 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def batch(vocab: int):
    """Three datums of different lengths, right-padded; weights include zeros and fractions."""
    g = torch.Generator().manual_seed(SEED)
    lengths = torch.tensor([9, 14, 5])
    n, t = len(lengths), int(lengths.max())
    ids = torch.zeros(n, t, dtype=torch.long)
    targets = torch.zeros(n, t, dtype=torch.long)
    weights = torch.zeros(n, t)
    for i, k in enumerate(lengths.tolist()):
        ids[i, :k] = torch.randint(0, vocab, (k,), generator=g)
        targets[i, :k] = torch.randint(0, vocab, (k,), generator=g)
        w = torch.rand(k, generator=g)
        w[0] = 0.0
        w[k // 2] = 0.5
        weights[i, :k] = w
    return ids, targets, weights, lengths


def peft_model(tiny: Path, adapter: Path | None = None, targets: list[str] = TARGETS):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    if adapter is not None:
        return PeftModel.from_pretrained(base, adapter).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def cross_entropy_pass(model, ids, targets, weights, lengths, prefix: str = "") -> dict:
    """Logits, per-token logprobs, the weighted cross-entropy and its gradients of every LoRA
    weight (f32 tensors named `PREFIX<name>`)."""
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    loss = -(weights * lp * mask).sum()
    loss.backward()
    tensors = {"logits": logits.detach(), "logprobs": (lp * mask).detach(), "loss": loss.detach()[None]}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            tensors["grad." + key] = p.grad.detach().float().clone()
    return {prefix + k: v for k, v in tensors.items()}


def peft_grads(tiny: Path, out: Path, targets: list[str] = TARGETS) -> None:
    """The f32 pass, and (named `bf16.*`) the same adapter on the base model loaded in bf16, as
    peft runs it there: its LoRA weights stay f32 (peft's `autocast_adapter_dtype`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = peft_model(tiny, targets=targets)
    model.save_pretrained(out / "adapter")
    ids, targets, weights, lengths = batch(model.config.vocab_size)
    tensors = {"input_ids": ids, "targets": targets, "weights": weights, "lengths": lengths}
    tensors.update(cross_entropy_pass(model, ids, targets, weights, lengths))
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).eval()
    bf16 = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True).eval()
    assert all(p.dtype == torch.float32 for n, p in bf16.named_parameters() if "lora_" in n)
    tensors.update(cross_entropy_pass(bf16, ids, targets, weights, lengths, "bf16."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))


TOP_K = 5


def peft_topk(tiny: Path, out: Path) -> None:
    """Cross-entropy with K targets per position, as Tinker documents it for top-K distillation:
    loss = -sum_{n,k} w[n,k] * log p(t[n,k]). The targets repeat ids within a position (as the
    SDK's zero padding does); the weights are teacher-like probabilities with zeroed entries."""
    model = peft_model(tiny)
    model.save_pretrained(out / "adapter")
    ids, _, _, lengths = batch(model.config.vocab_size)
    g = torch.Generator().manual_seed(SEED + 2)
    n, t = ids.shape
    targets = torch.randint(0, model.config.vocab_size, (n, t, TOP_K), generator=g)
    targets[:, :, TOP_K - 1] = targets[:, :, 0]
    weights = torch.softmax(torch.randn(n, t, TOP_K, generator=g), -1)
    weights[:, 0, :] = 0.0
    weights[:, :, 2] = 0.0
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits, -1).gather(-1, targets) * mask[..., None]
    loss = -(weights * lp).sum()
    loss.backward()
    tensors = {"input_ids": ids, "lengths": lengths, "targets": targets, "weights": weights,
               "logprobs": lp.detach(), "loss": loss.detach()[None]}
    for name, p in model.named_parameters():
        if "lora_" in name:
            tensors["grad." + name.replace(".default", "")] = p.grad.detach().float().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))


def peft_logits(tiny: Path, adapter: Path, out: Path) -> None:
    model = peft_model(tiny, adapter)
    ids, _, _, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids[1:2]).logits
    save_file({"input_ids": ids[1:2].contiguous(), "logits": logits.contiguous()}, str(out))


def losses(out: Path) -> None:
    g = torch.Generator().manual_seed(SEED + 2)
    n, v = 12, 50
    logits = torch.randn(n, v, generator=g) * 2
    targets = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    weights[0], weights[3], weights[5] = 0.0, 0.5, 0.25
    lp0 = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    sampling = lp0 + 0.4 * torch.randn(n, generator=g)  # ratios well inside and outside clips
    adv = torch.randn(n, generator=g)
    tensors = {"logits": logits, "targets": targets, "weights": weights, "sampling_logprobs": sampling,
               "advantages": adv}

    def run(name, fn):
        x = logits.clone().requires_grad_(True)
        lp = torch.log_softmax(x, -1).gather(-1, targets[:, None]).squeeze(-1)
        el = fn(lp)
        el.sum().backward()
        tensors[f"{name}.elementwise"] = el.detach()
        tensors[f"{name}.grad"] = x.grad.detach()

    run("cross_entropy", lambda lp: -(weights * lp))
    run("importance_sampling", lambda lp: -(torch.exp(lp - sampling) * adv))
    run("ppo", lambda lp: -torch.minimum(torch.exp(lp - sampling) * adv,
                                         torch.clamp(torch.exp(lp - sampling), 0.8, 1.2) * adv))
    run("cispo", lambda lp: -(torch.clamp(torch.exp(lp - sampling), 0.0, 4.0).detach() * lp * adv))
    run("dro", lambda lp: -(lp * adv - 0.05 * (lp - sampling) ** 2))
    run("ppo_weighted", lambda lp: -weights * torch.minimum(
        torch.exp(lp - sampling) * adv, torch.clamp(torch.exp(lp - sampling), 0.8, 1.2) * adv))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))


ADAM_CASES = {
    # name: (lr, betas, eps, weight_decay, clip)
    "adam": (1e-2, (0.9, 0.95), 1e-8, 0.0, 0.0),
    "adamw": (3e-3, (0.8, 0.99), 1e-6, 0.1, 0.0),
    "clipped": (1e-2, (0.9, 0.999), 1e-8, 0.0, 0.5),
}


def adam(out: Path) -> None:
    g = torch.Generator().manual_seed(SEED + 3)
    shapes = [(4, 6), (6, 4), (3,)]
    p0 = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    tensors = {f"p0.{i}": p for i, p in enumerate(p0)}
    for step, gs in enumerate(grads):
        for i, gr in enumerate(gs):
            tensors[f"grad.{step}.{i}"] = gr
    for name, (lr, betas, eps, wd, clip) in ADAM_CASES.items():
        params = [p.clone().requires_grad_(True) for p in p0]
        opt = (torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd) if wd > 0
               else torch.optim.Adam(params, lr=lr, betas=betas, eps=eps))
        for step, gs in enumerate(grads):
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad()
            for i, p in enumerate(params):
                tensors[f"{name}.{step}.{i}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "peft-grads":
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        modules = sys.argv[4].split(",") if len(sys.argv) > 4 else TARGETS
        peft_grads(Path(sys.argv[2]), Path(sys.argv[3]), modules)
    elif cmd == "peft-topk":
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        peft_topk(Path(sys.argv[2]), Path(sys.argv[3]))
    elif cmd == "peft-logits":
        peft_logits(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif cmd == "losses":
        losses(Path(sys.argv[2]))
    elif cmd == "adam":
        adam(Path(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
