"""What the job journal costs a client: submit latency of forward_backward requests (the server
writes each job to its database before answering) and a small training loop's wall time.

usage: .venv/bin/python scripts/journal_overhead.py   (server from LORALOOM_URL, default
127.0.0.1:8000; best on a small model, e.g. data/models/tiny64, so that the queue stays short)

Prints, for forward_backward bodies of 1 x 128 and 8 x 2048 tokens (targets and weights), the
median and 90th percentile of the time from sending the request to its answer (the future's id,
not its result), then the wall time of 20 forward_backward + optim_step rounds of 1 x 128.
Compare two servers (a binary before and after a change) by running it against each in turn.
"""

import os
import statistics
import time

import requests

from http_overhead import new_run, post, result

N = int(os.environ.get("N", "40"))


def body(model_id, n, length, vocab):
    data = []
    for i in range(n):
        toks = [(i * 37 + j * 11) % vocab for j in range(length + 1)]
        data.append({
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": toks[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": toks[1:], "dtype": "int64"},
                               "weights": {"data": [1.0] * length, "dtype": "float32"}},
        })
    return {"model_id": model_id, "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"}}


def main():
    s = requests.Session()
    model_id = new_run(s, {"rank": 8})
    vocab = 100  # valid in every model this is run on
    for n, length in ((1, 128), (8, 2048)):
        payload = body(model_id, n, length, vocab)
        times = []
        for _ in range(N):
            t = time.perf_counter()
            rid = post(s, "/api/v1/forward_backward", payload)["request_id"]
            times.append(time.perf_counter() - t)
            result(s, rid)  # the queue stays empty: each submit is timed alone
        times.sort()
        p50, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
        print(f"submit forward_backward {n} x {length}: p50 {p50 * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms over {N}")
    small = body(model_id, 1, 128, vocab)
    t = time.perf_counter()
    for _ in range(20):
        f = post(s, "/api/v1/forward_backward", small)["request_id"]
        o = post(s, "/api/v1/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-4}})["request_id"]
        result(s, f)
        result(s, o)
    print(f"20 rounds of forward_backward 1 x 128 + optim_step: {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
