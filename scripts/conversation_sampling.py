"""Multi-turn conversations, as tinker-cookbook's multi-turn environments sample them: each
turn's prompt is the whole conversation so far (the last prompt, what was sampled, and the
environment's reply), over real HTTP with the official `tinker` SDK.

For each BINARY in turn (alternately, ROUNDS rounds), starts `serve` on MODEL_DIR and runs
CONVERSATIONS conversations at once, TURNS turns each: a first prompt of PROMPT tokens, TOKENS
sampled tokens per turn, a REPLY-token environment reply after each. Prints the wall seconds of
the whole run and the prompt tokens the server counted as reused
(loraloom_sample_prompt_tokens_reused_total; none on a binary without a prefix cache), and for
each binary its best time against the first binary's.
usage: python scripts/conversation_sampling.py MODEL_DIR BINARY [BINARY ...]
env: CONVERSATIONS (8), TURNS (4), PROMPT (128), TOKENS (16), REPLY (24), ROUNDS (2)
"""

import concurrent.futures
import os
import time

from tinker import types

from sample_throughput import compare_binaries, metric, served

CONVERSATIONS = int(os.environ.get("CONVERSATIONS", "8"))
TURNS = int(os.environ.get("TURNS", "4"))
PROMPT = int(os.environ.get("PROMPT", "128"))
TOKENS = int(os.environ.get("TOKENS", "16"))
REPLY = int(os.environ.get("REPLY", "24"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))


def converse(sampler, c: int) -> int:
    """One conversation; the prompt tokens it sent."""
    prompt = [(c * 131 + j * 17) % 1000 + 20 for j in range(PROMPT)]
    params = types.SamplingParams(max_tokens=TOKENS, temperature=1.0, seed=c, stop=[])
    sent = 0
    for turn in range(TURNS):
        sent += len(prompt)
        said = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0].tokens
        reply = [(c * 7 + turn * 29 + j * 3) % 1000 + 20 for j in range(REPLY)]
        prompt = prompt + said + reply
    return sent


def measure(binary: str, model: str) -> dict:
    with served(binary, model) as (_, url, sc, base):
        sampler = sc.create_sampling_client(base_model=base).result()
        sampler.sample(types.ModelInput.from_ints([5] * PROMPT), 1,
                       types.SamplingParams(max_tokens=2, stop=[])).result()  # warm-up
        before = metric(url, "loraloom_sample_prompt_tokens_reused_total")
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONVERSATIONS) as pool:
            sent = sum(pool.map(lambda c: converse(sampler, c), range(CONVERSATIONS)))
        seconds = time.perf_counter() - t
        reused = metric(url, "loraloom_sample_prompt_tokens_reused_total") - before
        return {"seconds": round(seconds, 3), "prompt_tokens": sent, "reused": reused}


def main() -> None:
    compare_binaries(__doc__, "conversation_sampling", measure, "seconds",
                     {"conversations": CONVERSATIONS, "turns": TURNS, "prompt": PROMPT,
                      "max_tokens": TOKENS, "reply": REPLY}, ROUNDS)


if __name__ == "__main__":
    main()
