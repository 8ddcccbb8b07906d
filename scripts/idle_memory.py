"""What giving memory back when idle (`--release-memory-after-idle-secs`) saves and costs, over
real HTTP with the official `tinker` SDK.

For each setting of LORALOOM_RELEASE_MEMORY_AFTER_IDLE_SECS in turn (0 = keep, then 1; ROUNDS
rounds, alternately), starts BINARY `serve` on MODEL_DIR and trains one LoRA: WARM steps back
to back (forward_backward of 4 datums of 128 tokens, then optim_step), then PAUSES times an idle
pause of 3 s followed by one more step. Prints per setting and round: the server's least
resident memory (VmRSS) during the last pause, in MiB, the median seconds of the back-to-back
steps and of the steps after a pause (with release, those fault the memory given back in again).
usage: python scripts/idle_memory.py MODEL_DIR BINARY
env: WARM (4), PAUSES (3), ROUNDS (2)
"""

import json
import os
import statistics
import sys
import time

from tinker import types

from kv_memory import rss_mib
from sample_throughput import served

WARM = int(os.environ.get("WARM", "4"))
PAUSES = int(os.environ.get("PAUSES", "3"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))


def batch() -> list:
    data = []
    for d in range(4):
        tokens = [(d * 131 + j * 17) % 4000 + 100 for j in range(129)]
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 128}))
    return data


def step(tc, data) -> float:
    started = time.perf_counter()
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    return time.perf_counter() - started


def measure(binary: str, model: str, release: str) -> dict:
    os.environ["LORALOOM_RELEASE_MEMORY_AFTER_IDLE_SECS"] = release
    with served(binary, model) as (server, _url, sc, base):
        tc = sc.create_lora_training_client(base_model=base, rank=8).result()
        data = batch()
        busy = [step(tc, data) for _ in range(WARM)][1:]
        after_pause, idle = [], 0.0
        for _ in range(PAUSES):
            end = time.time() + 3
            idle = rss_mib(server.pid)
            while time.time() < end:
                time.sleep(0.05)
                idle = min(idle, rss_mib(server.pid))
            after_pause.append(step(tc, data))
        return {"idle_rss_mib": round(idle), "step_s": round(statistics.median(busy), 3),
                "step_after_pause_s": round(statistics.median(after_pause), 3)}


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model, binary = sys.argv[1:]
    for r in range(ROUNDS):
        for release in ("0", "1"):
            m = measure(binary, model, release)
            print(json.dumps({"release_after_idle_s": release, "round": r, **m}), flush=True)


if __name__ == "__main__":
    main()
