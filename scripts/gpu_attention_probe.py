"""On a GPU: which of PyTorch's attention kernels accept loraloom's training call (bf16, 32 query
/ 8 key-value heads of 64, causal or masked, grouped heads), which one the default dispatch
picks, and what a batch shape seen for the first time costs with it. Run it with and without
TORCH_CUDNN_SDPA_DEPRIORITIZED=1 (what the loraloom binary sets); BENCHMARKS.md ("Third GPU
session") has its figures on an H200.

usage: python3 scripts/gpu_attention_probe.py   (needs a CUDA device)"""
import json, os, time
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
env = os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "unset")

def call(b, t, gqa=True, mask=False):
    q = torch.randn(b, 32, t, 64, device=dev, dtype=dt, requires_grad=True)
    kv = 8 if gqa else 32
    k = torch.randn(b, kv, t, 64, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, kv, t, 64, device=dev, dtype=dt, requires_grad=True)
    m = None
    if mask:
        m = torch.zeros(b, 1, t, t, device=dev, dtype=dt)
        m.masked_fill_(torch.ones(t, t, device=dev, dtype=torch.bool).triu(1), float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None, enable_gqa=gqa)
    o.sum().backward()

def timed(*a, **kw):
    torch.cuda.synchronize(); s = time.perf_counter(); call(*a, **kw); torch.cuda.synchronize()
    return round(time.perf_counter() - s, 4)

for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                 ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
    for gqa, mask in [(True, False), (True, True), (False, False)]:
        try:
            with sdpa_kernel([be]):
                call(2, 16, gqa, mask)
            ok = True
        except Exception as e:  # noqa: BLE001
            ok = str(e).split("\n")[0][:80]
        print(json.dumps({"env": env, "backend": name, "gqa": gqa, "mask": mask, "works": ok}), flush=True)
for gqa, mask in [(True, False), (True, True)]:
    for b in [16, 16, 15, 15, 14, 3]:
        print(json.dumps({"env": env, "gqa": gqa, "mask": mask, "b": b, "t": 128, "seconds": timed(b, 128, gqa, mask)}), flush=True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    call(7, 128, True, False); call(7, 128, True, True)
print(env, sorted({e.key for e in prof.key_averages() if "attention" in e.key}), flush=True)
