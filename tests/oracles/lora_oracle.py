#!/usr/bin/env python3
"""Oracles for LoRA training: peft logits/gradients, the Tinker losses, Adam.

Usage:
  lora_oracle.py peft-grads TINY_DIR OUT_DIR [TARGETS]
                                                  peft adapter (given random A/B) + batch, loss, grads
                                                  (f32, and bf16.* with the base in bf16); TARGETS:
                                                  comma-separated modules (default all seven + lm_head)
  lora_oracle.py peft-logits TINY_DIR ADAPTER OUT logits of TINY_DIR + a saved adapter, via peft
  lora_oracle.py moe-grads TINY_DIR OUT_DIR       a mixture of experts (tiny qwen3_moe, gpt_oss): peft on
                                                  attention and lm_head, and each expert's own LoRA
                                                  on gate/up/down (rank r / experts per token) in
                                                  plain PyTorch; loraloom's checkpoint of it, batch,
                                                  loss, grads
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


MOE_RANK = 6


def expert_lora_forward(experts, scale, gpt_oss: bool = False):
    """transformers' eager experts' forward (Qwen3MoeExperts, or GptOssExperts with its biases,
    interleaved gate/up columns and clamped SwiGLU) with each expert's LoRA on gate, up and
    down: `W x + scale * B_e (A_e x)`, A_e/B_e from the module's `lora` parameters."""
    import torch.nn.functional as F

    p = experts.lora

    def lora(x, w, e):
        return scale * F.linear(F.linear(x, p[f"{w}_A"][e]), p[f"{w}_B"][e])

    def project(x, e):
        if not gpt_oss:
            inter = experts.down_proj.shape[-1]
            w = experts.gate_up_proj[e]
            gate = F.linear(x, w[:inter]) + lora(x, "w1", e)
            up = F.linear(x, w[inter:]) + lora(x, "w3", e)
            act = F.silu(gate) * up
            return F.linear(act, experts.down_proj[e]) + lora(act, "w2", e)
        w, b = experts.gate_up_proj[e], experts.gate_up_proj_bias[e]
        gate = x @ w[:, 0::2] + b[0::2] + lora(x, "w1", e)
        up = x @ w[:, 1::2] + b[1::2] + lora(x, "w3", e)
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        act = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return act @ experts.down_proj[e] + experts.down_proj_bias[e] + lora(act, "w2", e)

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(experts.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = project(hidden_states[token_idx], e)
            out.index_add_(0, token_idx, y * top_k_weights[token_idx, slot, None])
        return out

    return forward


def moe_grads(tiny: Path, out: Path) -> None:
    """Attention and unembedding adapters by peft; the dense layer's MLP adapters and each
    expert's own in plain PyTorch (transformers' router decides; given MLP names, peft would
    adapt the experts' fused parameters its own way). Saved as loraloom's checkpoint: peft's
    files plus the MLP's `A` and `B` under peft's names and each expert projection's `A`
    `[E, r_e, in]` and `B` `[E, out, r_e]` under Tinker's (`mlp.experts.w1/w3/w2`), all scaled by
    alpha / r as the cookbook merges them."""
    import json

    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    cfg = LoraConfig(r=MOE_RANK, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"])
    model = get_peft_model(base, cfg)
    c = base.config
    gpt_oss = c.model_type == "gpt_oss"
    r_e = max(1, MOE_RANK // c.num_experts_per_tok)
    scale = 8 / MOE_RANK
    ours = {}  # loraloom's checkpoint key -> parameter, beside peft's
    for i, layer in enumerate(base.model.layers):
        prefix = f"base_model.model.model.layers.{i}.mlp"
        if hasattr(layer.mlp, "experts"):
            mod = layer.mlp.experts
            h, n = c.hidden_size, c.num_experts
            inter = c.intermediate_size if gpt_oss else c.moe_intermediate_size
            shapes = {"w1": (inter, h), "w3": (inter, h), "w2": (h, inter)}
            mod.lora = torch.nn.ParameterDict({
                f"{w}_{half}": torch.nn.Parameter(torch.zeros(shape))
                for w, (o, inp) in shapes.items()
                for half, shape in (("A", (n, r_e, inp)), ("B", (n, o, r_e)))
            })
            mod.forward = expert_lora_forward(mod, scale, gpt_oss)
            for key, p in mod.lora.items():
                w, half = key.split("_")
                ours[f"{prefix}.experts.{w}.lora_{half}.weight"] = p
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, proj)
            a = torch.nn.Parameter(torch.zeros(MOE_RANK, lin.in_features))
            b = torch.nn.Parameter(torch.zeros(lin.out_features, MOE_RANK))
            lin.forward = (lambda lin, a, b: lambda x: F.linear(x, lin.weight)
                           + scale * F.linear(F.linear(x, a), b))(lin, a, b)
            ours[f"{prefix}.{proj}.lora_A.weight"] = a
            ours[f"{prefix}.{proj}.lora_B.weight"] = b
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for p in ours.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ids, targets, weights, lengths = batch(c.vocab_size)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    loss = -(weights * lp * mask).sum()
    loss.backward()
    tensors = {"input_ids": ids, "targets": targets, "weights": weights, "lengths": lengths,
               "logits": logits.detach(), "logprobs": (lp * mask).detach(), "loss": loss.detach()[None]}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            tensors["grad." + name.replace(".default", "")] = p.grad.detach().float().clone()
    adapter = out / "adapter"
    model.save_pretrained(adapter)
    weights_file = adapter / "adapter_model.safetensors"
    saved = load_file(str(weights_file))
    for name, p in ours.items():
        saved[name] = p.detach().clone()
        tensors["grad." + name] = p.grad.detach().float().clone()
    save_file({k: v.contiguous() for k, v in saved.items()}, str(weights_file))
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = TARGETS
    config_file.write_text(json.dumps(config))
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
    elif cmd == "moe-grads":
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        moe_grads(Path(sys.argv[2]), Path(sys.argv[3]))
    elif cmd == "peft-logits":
        peft_logits(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif cmd == "losses":
        losses(Path(sys.argv[2]))
    elif cmd == "adam":
        adam(Path(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
