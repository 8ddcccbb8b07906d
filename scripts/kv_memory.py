"""Memory of a decode batch whose sequences differ in length, over real HTTP with the official
`tinker` SDK: a batch's key/value cache pads every row to its longest, so one long prompt among
short ones sets the size of every row.

For each BINARY in turn (alternately, ROUNDS rounds), starts `serve` on MODEL_DIR and sends at
once SHORT requests of 16-token prompts and one of a LONG-token prompt, max_tokens TOKENS each,
while sampling the server's resident memory (VmRSS, every 5 ms): the peak above what it held
before the crowd (the first of a fresh server: libtorch's allocator keeps what a crowd took), in
MiB, and the crowd's wall seconds.

Prints one JSON line per binary and round, and for each binary its least peak against the first
binary's.
usage: python scripts/kv_memory.py MODEL_DIR BINARY [BINARY ...]
env: SHORT (31), LONG (400), TOKENS (48), ROUNDS (2)
"""

import os
import threading
import time

from tinker import types

from sample_throughput import compare_binaries, served

SHORT = int(os.environ.get("SHORT", "31"))
LONG = int(os.environ.get("LONG", "400"))
TOKENS = int(os.environ.get("TOKENS", "48"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(l for l in f if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def crowd(sampler) -> float:
    """Sends the long request and the short ones at once; seconds until every one finished."""
    params = types.SamplingParams(max_tokens=TOKENS, temperature=1.0, seed=5, stop=[])
    short = [types.ModelInput.from_ints([(i * 29 + j * 7) % 1000 + 20 for j in range(16)])
             for i in range(SHORT)]
    long = types.ModelInput.from_ints([(j * 13) % 1000 + 20 for j in range(LONG)])
    prompts = [long] + short
    t = time.perf_counter()
    futures = [sampler.sample(p, 1, params) for p in prompts]
    for f in futures:
        assert len(f.result().sequences[0].tokens) == TOKENS
    return time.perf_counter() - t


def measure(binary: str, model: str) -> dict:
    with served(binary, model) as (server, _, sc, base):
        sampler = sc.create_sampling_client(base_model=base).result()
        # No warm-up: the allocator keeps what a crowd took, so a second one would show nothing.
        before = rss_mib(server.pid)
        peak = [before]
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib(server.pid))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            seconds = crowd(sampler)
        finally:
            done.set()
            watcher.join()
        return {"peak_mib": round(peak[0] - before, 1), "seconds": round(seconds, 3),
                "rss_before_mib": round(before, 1)}


def main() -> None:
    compare_binaries(__doc__, "kv_memory", measure, "peak_mib",
                     {"short": SHORT, "long_prompt": LONG, "max_tokens": TOKENS}, ROUNDS)


if __name__ == "__main__":
    main()
