"""`gspo` through the SDK against Tinker's documented formula in torch, on the same weights: a
fresh adapter (B = 0) computes the base model, so transformers gives the target logprobs.

  s   = exp(mean over sequence_ratio_mask of (sg(lp) - q))
  s_t = sg(s) · exp(lp - sg(lp))
  L   = -Σ_t min(s_t · A_t, clamp(s_t, 0.8, 1.2) · A_t)

Tolerance 1e-3 on the loss sum (f32, ~20 tokens, summation order only) and 1e-4 on logprobs."""

import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from conftest import DEFAULT_MODEL_DIR, MODEL_NAME

TOKENS = [1, 504, 3437, 314, 260, 2386, 30, 5248, 17, 42, 1200, 9, 77, 300, 12, 8, 4000, 21, 5, 6]


def torch_gspo(lp, q, adv, mask, lo=0.8, hi=1.2):
    log_ratio = (lp.detach() - q)[mask != 0].mean()
    ratio = torch.exp(log_ratio + lp - lp.detach())
    return -torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv).sum()


def test_gspo_loss_equals_the_documented_formula(server):
    inputs, targets = TOKENS[:-1], TOKENS[1:]
    n = len(targets)
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = base(torch.tensor([inputs])).logits[0].float()
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(targets)[:, None])[:, 0]
    gen = torch.Generator().manual_seed(0)
    q = lp + 0.3 * torch.randn(n, generator=gen)
    adv = torch.randn(n, generator=gen)
    mask = (torch.arange(n) >= 5).float()
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-gspo")
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={"target_tokens": targets, "logprobs": q.tolist(), "advantages": adv.tolist(),
                        "sequence_ratio_mask": mask.tolist()},
    )
    for config in (None, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}):
        out = tc.forward_backward([datum], "gspo", config).result()
        got_lp = torch.tensor(out.loss_fn_outputs[0]["logprobs"].data)
        assert torch.allclose(got_lp, lp, atol=1e-4)
        lo, hi = (0.8, 1.2) if config is None else (0.9, 1.05)
        want = torch_gspo(lp, q, adv, mask, lo, hi).item()
        assert abs(out.metrics["loss:sum"] - want) < 1e-3, (out.metrics["loss:sum"], want)
    sc.close("success").result()
