#!/usr/bin/env python3
"""Oracle for the decoder: builds tiny random checkpoints with transformers and records its logits.

Usage:
  tiny_models.py make ARCH OUT_DIR     tiny random ARCH checkpoint (fixed seed) + expected.safetensors
                                       (ARCH qwen3_moe, mixtral: experts one tensor each, as on
                                       the Hub; *_fused: transformers 5's fused expert tensors;
                                       qwen3_moe_wide: 400 experts; *_window: sliding-window
                                       attention; *_yarn: YaRN RoPE scaling; gpt_oss_mxfp4: the
                                       experts stored as MXFP4 blocks and scales, the logits
                                       from transformers' dequantization of them)
  tiny_models.py default MODEL_DIR OUT  logits of the default model on a fixed 32-token prompt
  tiny_models.py bf16 DIR OUT           logits of DIR's checkpoint loaded by transformers in bf16
                                       (what it keeps in f32 stays so) on expected.safetensors'
                                       inputs

expected.safetensors holds `input_ids` [B,T] (right-padded with 0), `lengths` [B] and `logits`
[B,T,V] from transformers with an attention mask (positions past a row's length are padding).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import save_file

SEED = 1234

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        # llama3-style RoPE scaling exercised here; untied LM head.
        return tf.LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        )
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="default", rope_theta=1e6))
    if arch in ("qwen3_moe", "qwen3_moe_fused"):
        # Layer 1 dense (mlp_only_layers), layers 0 and 2 sparse; top-3 of 8 experts,
        # renormalised as Qwen3-30B-A3B does.
        return tf.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=32,
                                 tie_word_embeddings=False, num_experts=8, num_experts_per_tok=3,
                                 moe_intermediate_size=32, norm_topk_prob=True,
                                 decoder_sparse_step=1, mlp_only_layers=[1],
                                 rope_parameters=dict(rope_type="default", rope_theta=1e6))
    if arch == "qwen3_moe_wide":
        # 400 experts: a stack of expert adapters holds 1023 // 400 = 2 adapters (one grouped
        # matmul group per adapter and expert, at most 1023 groups on a GPU).
        return tf.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 2}, head_dim=32,
                                 tie_word_embeddings=False, num_experts=400,
                                 num_experts_per_tok=2, moe_intermediate_size=16,
                                 norm_topk_prob=True, decoder_sparse_step=1,
                                 rope_parameters=dict(rope_type="default", rope_theta=1e6))
    if arch in ("mixtral", "mixtral_fused"):
        return tf.MixtralConfig(**COMMON, tie_word_embeddings=False, num_local_experts=8,
                                num_experts_per_tok=2, sliding_window=None,
                                rope_parameters=dict(rope_type="default", rope_theta=1e6))
    if arch == "qwen3_yarn":
        # Qwen3's long-context setting at a scale where its ramp blends several frequencies:
        # pre-trained on 64 positions, stretched 4 times.
        return tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                   original_max_position_embeddings=64))
    if arch == "llama_yarn":
        # GPT-OSS's flavour: the ramp's ends not rounded, other betas, a given attention factor.
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=False,
                              rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                   original_max_position_embeddings=32, beta_fast=16.0,
                                                   beta_slow=2.0, truncate=False, attention_factor=1.3))
    if arch in ("gpt_oss", "gpt_oss_mxfp4"):
        # Layer 0 attends within a 6-token window, layer 1 to everything (GPT-OSS alternates
        # them); top-2 of 8 biased experts, clamped at 1.5 (GPT-OSS's 7 is rarely reached by
        # weights this small); untruncated YaRN as GPT-OSS ships it.
        return tf.GptOssConfig(**{**COMMON, "intermediate_size": 32}, head_dim=16, swiglu_limit=1.5,
                               num_local_experts=8, num_experts_per_tok=2, sliding_window=6,
                               tie_word_embeddings=False, attn_implementation="eager",
                               rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                    factor=4.0, original_max_position_embeddings=32,
                                                    beta_fast=32.0, beta_slow=1.0, truncate=False))
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=False)
    if arch == "qwen2_window":
        # Layer 1 attends within a 6-token sliding window, layer 0 to everything.
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=False, use_sliding_window=True,
                              sliding_window=6, max_window_layers=1)
    if arch == "mistral_window":
        # Every layer attends within a 5-token sliding window (Mistral-7B-v0.1's kind).
        return tf.MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=5)
    if arch == "mistral":
        # Every query head with its own key/value head (no grouping), unlike the others.
        return tf.MistralConfig(**{**COMMON, "num_key_value_heads": 4},
                                tie_word_embeddings=False, sliding_window=None)
    raise SystemExit(f"unknown arch {arch}")


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough that every component visibly moves the logits."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".sinks"):
                # Sink logits as large as the scores, so they visibly take probability mass.
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def batch_inputs(vocab: int):
    g = torch.Generator().manual_seed(SEED + 1)
    lengths = torch.tensor([20, 11, 4])
    ids = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, lengths, mask


# Per family: the Hub's module holding a layer's experts, and its gate/up/down projections.
HUB_EXPERTS = {
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
}


def split_experts(state: dict, model_type: str) -> dict:
    """transformers 5's fused expert tensors as the Hub's one tensor per expert and projection
    (what `save_pretrained` writes: `gate_up_proj` is the gate rows, then the up rows)."""
    if model_type not in HUB_EXPERTS:
        return state
    block, gate, up, down = HUB_EXPERTS[model_type]
    out = {}
    for name, value in state.items():
        hub = name.replace(".mlp.", f".{block}.")
        if name.endswith(".experts.gate_up_proj"):
            base = hub[: -len("gate_up_proj")]
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{base}{e}.{gate}.weight"] = value[e, :inter]
                out[f"{base}{e}.{up}.weight"] = value[e, inter:]
        elif name.endswith(".experts.down_proj"):
            base = hub[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{base}{e}.{down}.weight"] = value[e]
        elif name.endswith(".mlp.gate.weight"):
            out[hub] = value
        else:
            out[name] = value
    return out


def save_checkpoint(model, out: Path, fused_experts: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if not fused_experts:
        state = split_experts(state, model.config.model_type)
    state = {k: v.contiguous() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_mxfp4(w: torch.Tensor):
    """`w` [E, out, in] as MXFP4 blocks [E, out, in/32, 16] (two values a byte, the low nibble
    first) and scales [E, out, in/32] (a power of two per 32 values, biased by 127): each group's
    scale the least that keeps its largest value within E2M1's 6, each value the nearest E2M1."""
    values = FP4_VALUES.to(w.device)
    blocks, scales = [], []
    for one in w:  # an expert at a time: the distances to the 16 values are 64x its size
        rows, cols = one.shape
        groups = one.float().reshape(rows, cols // 32, 32)
        amax = groups.abs().amax(-1).clamp_min(1e-30)
        exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
        scaled = groups / torch.exp2(exponent)[..., None]
        codes = (scaled[..., None] - values).abs().argmin(-1).to(torch.uint8)
        blocks.append(codes[..., 0::2] | (codes[..., 1::2] << 4))
        scales.append((exponent + 127).to(torch.uint8))
    return torch.stack(blocks).contiguous(), torch.stack(scales).contiguous()


def to_mxfp4(model, out: Path) -> dict:
    """Quantizes `model`'s expert weights to MXFP4 in place (the weights become transformers'
    own dequantization of the blocks and scales) and returns the state dict as OpenAI ships
    it: `…experts.{gate_up,down}_proj_{blocks,scales}` instead of the weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = quantize_mxfp4(p.detach().transpose(1, 2))
                p.copy_(convert_moe_packed_tensors(blocks, scales, dtype=p.dtype))
                packed[name + "_blocks"] = blocks
                packed[name + "_scales"] = scales
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    return {**state, **packed}


def save_mxfp4(model, out: Path) -> None:
    """Writes GPT-OSS `model` to `out` as OpenAI ships it (`to_mxfp4`), with the
    `quantization_config` transformers reads such a checkpoint by."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in to_mxfp4(model, out).items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def make(arch: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    if arch.startswith("gpt_oss"):
        # As OpenAI's checkpoints name it (tinker-cookbook's merge recognises GPT-OSS by it).
        model.config.architectures = ["GptOssForCausalLM"]
    randomize(model)
    if arch.endswith("_mxfp4"):
        save_mxfp4(model, out)
    else:
        save_checkpoint(model, out, fused_experts=arch.endswith("_fused"))
    ids, lengths, mask = batch_inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    if arch in HUB_EXPERTS:
        # The per-expert tensors written above are what transformers reads from the Hub.
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            again = reloaded(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(again, logits), (again - logits).abs().max()
    save_file({"input_ids": ids, "lengths": lengths, "logits": logits.contiguous()},
              str(out / "expected.safetensors"))


def bf16_logits(tiny: Path, out: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).eval()
    e = load_file(str(tiny / "expected.safetensors"))
    mask = (torch.arange(e["input_ids"].shape[1])[None, :] < e["lengths"][:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=e["input_ids"], attention_mask=mask).logits.float()
    save_file({"logits": logits.contiguous()}, str(out))


PROMPT = (
    "The quick brown fox jumps over the lazy dog. Meanwhile, in Paris, the capital of France, "
    "people were enjoying a quiet afternoon by the river with friends and family."
)


def default(model_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok(PROMPT).input_ids[:32]])
    assert ids.shape[1] == 32, ids.shape
    paris = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        greedy = model.generate(paris, max_new_tokens=12, do_sample=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids, "lengths": torch.tensor([32]), "logits": logits.contiguous(),
               "paris_prompt": paris, "paris_greedy": greedy}, str(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], Path(sys.argv[3]))
    elif cmd == "default":
        default(Path(sys.argv[2]), Path(sys.argv[3]))
    elif cmd == "bf16":
        bf16_logits(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
