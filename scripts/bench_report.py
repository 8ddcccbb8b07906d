"""Turns the JSON lines of scripts/bench into the ratios recorded in BENCHMARKS.md."""

import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault(r["what"], []).append(r)


def one(what, **match):
    for r in by.get(what, []):
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


print("\n| measurement | loraloom | baseline | ratio |\n|---|---|---|---|")
f, hf = one("forward"), one("hf_forward")
if f and hf:
    print(f"| forward 4x128 tokens/s | {f['tokens_per_s']:.0f} | transformers {hf['tokens_per_s']:.0f} | "
          f"{f['tokens_per_s'] / hf['tokens_per_s']:.2f}x |")
t, pt, roof = one("train_step"), one("peft_train_step"), one("matmul_roofline")
if t and pt:
    print(f"| forward_backward+optim_step 4x128 r16 tokens/s | {t['tokens_per_s']:.0f} | peft {pt['tokens_per_s']:.0f} | "
          f"{t['tokens_per_s'] / pt['tokens_per_s']:.2f}x |")
if t and roof:
    bound = roof["gflops"] * 1e9 / t["flops_per_token"]
    print(f"| same step vs matmul roofline ({roof['gflops']:.0f} GFLOP/s, 4N FLOP/token) | {t['tokens_per_s']:.0f} | "
          f"roofline {bound:.0f} | {t['tokens_per_s'] / bound:.2f} of roofline |")
for seqs, adapters, label in ((1, 0, "1 sequence, base"), (8, 1, "8 sequences, 1 adapter"), (8, 8, "8 sequences, 8 adapters")):
    d = one("decode", sequences=seqs, adapters=adapters)
    g = one("hf_generate", sequences=seqs)
    if d and g:
        print(f"| decode {label} tokens/s | {d['tokens_per_s']:.0f} | transformers.generate {g['tokens_per_s']:.0f} | "
              f"{d['tokens_per_s'] / g['tokens_per_s']:.2f}x |")
d1, d8 = one("decode", sequences=8, adapters=1), one("decode", sequences=8, adapters=8)
if d1 and d8:
    print(f"| decode 8 adapters vs 8 sequences of 1 adapter | {d8['tokens_per_s']:.0f} | {d1['tokens_per_s']:.0f} | "
          f"{d8['tokens_per_s'] / d1['tokens_per_s']:.2f}x |")
for e in by.get("decode", []):
    if e.get("interleaved") and d1:
        model = e.get("model", "default")
        print(f"| decode ({model} model) {e['sequences']} sequences, one request each over {e['adapters']} adapters "
              f"(mixed rows) tokens/s | {e['tokens_per_s']:.0f} | 8 sequences of 1 adapter {d1['tokens_per_s']:.0f} | "
              f"{e['tokens_per_s'] / d1['tokens_per_s']:.2f}x |")
for e in by.get("engine", []):
    model = e.get("model", "default")
    print(f"| engine ({model} model) {e['tenants']} tenants x (fb 1x{e['len']} + optim) tokens/s | {e['loraloom_tokens_per_s']:.0f} | "
          f"one batch {e['one_batch_tokens_per_s']:.0f} / seed design {e['seed_design_tokens_per_s']:.0f} | "
          f"{e['vs_one_batch']:.2f}x / {e['vs_seed_design']:.2f}x (mean batch {e['mean_batch_size']:.1f}) |")
for o in by.get("optim_step", []):
    model = o.get("model", "default")
    print(f"| fused optimizer step, {o['runs']} runs ({model} model, {o['parameters_per_run']} parameters per run) | "
          f"{o['seconds'] * 1e3:.2f} ms | one run | {o['vs_one_run']:.1f}x the time |")
a, c = one("sample_alone"), one("sample_crowd")
if a and c:
    print(f"| HTTP sampling, {c['requests']} concurrent requests over {c['adapters']} adapters, max_tokens 16-64 (tiny64 model) "
          f"tokens/s | {c['tokens_per_s']:.0f} | one request alone {a['tokens_per_s']:.0f} | {c['vs_alone']:.2f}x (goal >= 10x) |")
    if "client_cpu_s" in c:
        print(f"| that crowd's CPU: SDK client / server worker / server HTTP threads (wall {c['seconds'] * 1e3:.0f} ms) | "
              f"{c['client_cpu_s'] * 1e3:.0f} / {c['server_worker_cpu_s'] * 1e3:.0f} / {c['server_http_cpu_s'] * 1e3:.0f} ms | "
              f"the same 32 requests at max_tokens 1 | {c['max_tokens_1_seconds'] * 1e3:.0f} ms wall |")
n = one("sample_num_samples")
if n:
    print(f"| HTTP sampling, num_samples 16 vs 1 (tiny64 model, 32 tokens) | {n['n16_s'] * 1e3:.0f} ms, "
          f"{n['prefills_n16']:.0f} prefill | {n['n1_s'] * 1e3:.0f} ms | {n['ratio']:.2f}x the time (goal <= 2x) |")
b = one("sample_behind_long")
if b:
    print(f"| HTTP sampling, 8 short requests (16 tokens) sent while a 512-token one decodes (tiny64 model), mean latency | "
          f"{b['short_behind_long_s'] * 1e3:.0f} ms | one short request alone {b['short_alone_s'] * 1e3:.0f} ms "
          f"(the long one's remaining time: {b['long_rest_s'] * 1e3:.0f} ms) | {b['ratio']:.2f}x |")
