"""Implementation of scripts/concurrent_users (see that file)."""

import os
import sys
import threading
import time

import tinker
from tinker import types

URL = os.environ.get("LORALOOM_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("TINKER_API_KEY", "tml-concurrent-users")
STEPS = 3
SEQ_LEN = 128


def user(index: int, base_model: str, out: dict) -> None:
    started = time.perf_counter()
    # Closed explicitly (the with block): an SDK client left to interpreter exit can abort it.
    with tinker.ServiceClient(base_url=URL, api_key=KEY) as sc:
        tc = sc.create_lora_training_client(base_model=base_model, rank=16, seed=index).result()
        tokens = [(index * 131 + j * 17) % 30000 + 100 for j in range(SEQ_LEN + 1)]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * SEQ_LEN},
        )
        losses = []
        for _ in range(STEPS):
            fb = tc.forward_backward([datum], "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
            losses.append(fb.result().metrics["loss:sum"])
            opt.result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        res = sampler.sample(types.ModelInput.from_ints(tokens[:16]), num_samples=1,
                             sampling_params=types.SamplingParams(max_tokens=16, temperature=0.0)).result()
        assert len(res.sequences[0].tokens) > 0
    out[index] = {"seconds": time.perf_counter() - started, "first_loss": losses[0], "last_loss": losses[-1]}


def run(n: int, base_model: str, concurrent: bool) -> tuple[float, dict]:
    out: dict = {}
    started = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=user, args=(i, base_model, out)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(n):
            user(i, base_model, out)
    if len(out) != n:
        raise SystemExit(f"only {len(out)} of {n} users finished")
    return time.perf_counter() - started, out


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [4]
    caps = tinker.RestClient(base_url=URL, api_key=KEY).get_server_capabilities().result()
    base_model = caps.supported_models[0].model_name
    print(f"server {URL}, model {base_model}, {STEPS} steps of 1 x {SEQ_LEN} tokens + 16-token sample per user")
    speedup = 0.0
    for n in counts:
        serial, _ = run(n, base_model, concurrent=False)
        together, per_user = run(n, base_model, concurrent=True)
        for i in sorted(per_user):
            u = per_user[i]
            print(f"  N={n} user {i}: {u['seconds']:.2f}s  loss {u['first_loss']:.1f} -> {u['last_loss']:.1f}")
        speedup = serial / together
        print(f"N={n}: one after another {serial:.2f}s, concurrently {together:.2f}s, "
              f"{n * STEPS * SEQ_LEN / together:.0f} train tokens/s, speedup {speedup:.2f}x")
    print(f"speedup: {speedup:.2f}")


if __name__ == "__main__":
    main()
