"""Time of one `forward_backward_custom` step with a loss uploaded by `create_custom_loss` (it
runs on the server, in one request) against the same per-datum function passed as a plain
callable (the SDK's client-side path: a forward request, PyTorch on the client, a backward
request), on one server, over real HTTP with the official `tinker` SDK.

Each round times STEPS steps of each path on its own run (same seed), alternating the paths, and
prints one JSON line; the last line holds each path's best round and their ratio.
usage: python scripts/custom_loss_speed.py MODEL_DIR BINARY
env: DATUMS (8), TOKENS (128), STEPS (3), ROUNDS (3)
"""

import json
import os
import sys
import time

import torch
from tinker import types

from sample_throughput import served

DATUMS = int(os.environ.get("DATUMS", "8"))
TOKENS = int(os.environ.get("TOKENS", "128"))
STEPS = int(os.environ.get("STEPS", "3"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def ppo_like(logprobs, old, adv):
    ratio = torch.exp(logprobs - old)
    objective = torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    return -objective.sum(), {"custom/ratio:mean": ratio.mean()}


def client_side(data, logprobs_list):
    total = 0.0
    for datum, logprobs in zip(data, logprobs_list):
        old = datum.loss_fn_inputs["old"].to_torch()
        adv = datum.loss_fn_inputs["adv"].to_torch()
        total = total + ppo_like(logprobs, old, adv)[0]
    return total, {}


def data():
    out = []
    for i in range(DATUMS):
        tokens = [(i * 97 + j * 13) % 1000 + 20 for j in range(TOKENS + 1)]
        out.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:],
                            "old": torch.full((TOKENS,), -8.0),
                            "adv": torch.linspace(-1.0, 1.0, TOKENS)}))
    return out


def steps(tc, batch, loss) -> float:
    t = time.perf_counter()
    for _ in range(STEPS):
        tc.forward_backward_custom(batch, loss).result()
    return (time.perf_counter() - t) / STEPS


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model, binary = sys.argv[1], sys.argv[2]
    batch = data()
    with served(binary, model) as (_, _url, sc, base):
        handle = sc.create_custom_loss(ppo_like, {"logprobs": 1, "old": 1, "adv": 1}).result()
        server_tc = sc.create_lora_training_client(base_model=base, rank=8, seed=1).result()
        client_tc = sc.create_lora_training_client(base_model=base, rank=8, seed=1).result()
        steps(server_tc, batch[:1], handle)  # warm-up
        steps(client_tc, batch[:1], client_side)
        best = {"server_s": float("inf"), "client_s": float("inf")}
        for r in range(ROUNDS):
            row = {"server_s": steps(server_tc, batch, handle),
                   "client_s": steps(client_tc, batch, client_side)}
            best = {k: min(best[k], v) for k, v in row.items()}
            print(json.dumps({"what": "custom_loss_step", "round": r, "datums": DATUMS,
                              "tokens": TOKENS, **{k: round(v, 3) for k, v in row.items()}}),
                  flush=True)
        print(json.dumps({"what": "custom_loss_step_best", **{k: round(v, 3) for k, v in best.items()},
                          "client_over_server": round(best["client_s"] / best["server_s"], 2)}))


if __name__ == "__main__":
    main()
