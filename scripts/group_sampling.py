"""A group of sampling requests with one prompt, as tinker-cookbook's RL loops send a group
(`num_samples` 1 per environment, the group's environments sharing their prompt), over real
HTTP with the official `tinker` SDK.

For each BINARY in turn (alternately, ROUNDS rounds, so that binaries compare within one run
on a shared machine), starts `serve` on MODEL_DIR and sends, GROUP requests at once:

  distinct   GROUP different prompts of PROMPT tokens, max_tokens TOKENS each: the same work
             without sharing (first)
  same       one PROMPT-token prompt, max_tokens TOKENS each: wall seconds, and the prefills
             and shared prompts the server counted (loraloom_sample_prefills_total,
             loraloom_sample_prompts_shared_total; a binary without sharing counts none shared)

Prints one JSON line per binary and round, and for each binary the best `same` time against the
first binary's.
usage: python scripts/group_sampling.py MODEL_DIR BINARY [BINARY ...]
env: GROUP (16), PROMPT (256), TOKENS (16), ROUNDS (2)
"""

import os
import time

from tinker import types

from sample_throughput import compare_binaries, metric, served

GROUP = int(os.environ.get("GROUP", "16"))
PROMPT = int(os.environ.get("PROMPT", "256"))
TOKENS = int(os.environ.get("TOKENS", "16"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))


def prompt(i: int) -> types.ModelInput:
    return types.ModelInput.from_ints([(i * 131 + j * 17) % 1000 + 20 for j in range(PROMPT)])


def group(sampler, prompts) -> float:
    """Sends one request per prompt at once; seconds until every one finished."""
    params = types.SamplingParams(max_tokens=TOKENS, temperature=1.0, seed=3, stop=[])
    t = time.perf_counter()
    futures = [sampler.sample(p, 1, params) for p in prompts]
    for f in futures:
        assert len(f.result().sequences[0].tokens) == TOKENS
    return time.perf_counter() - t


def measure(binary: str, model: str) -> dict:
    with served(binary, model) as (_, url, sc, base):
        sampler = sc.create_sampling_client(base_model=base).result()
        group(sampler, [types.ModelInput.from_ints([5] * PROMPT)])  # warm-up (no prompt of the run)
        counts = lambda: (metric(url, "loraloom_sample_prefills_total"),
                          metric(url, "loraloom_sample_prompts_shared_total"))
        # Distinct first: what one server did before a measurement (allocations it made) is then
        # the same for every binary.
        distinct = group(sampler, [prompt(1 + i) for i in range(GROUP)])
        before = counts()
        same = group(sampler, [prompt(0)] * GROUP)
        after = counts()
        return {"same_s": round(same, 3), "distinct_s": round(distinct, 3),
                "same_vs_distinct": round(same / distinct, 3),
                "prefills": after[0] - before[0], "shared": after[1] - before[1]}


def main() -> None:
    compare_binaries(__doc__, "group_sampling", measure, "same_s",
                     {"group": GROUP, "prompt_tokens": PROMPT, "max_tokens": TOKENS}, ROUNDS)


if __name__ == "__main__":
    main()
