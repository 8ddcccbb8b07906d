"""Round-trip overhead of a trivial future and /retrieve_future throughput on loopback.

usage: .venv/bin/python scripts/http_overhead.py   (server from LORALOOM_URL, default 127.0.0.1:8000)

A trivial future is an optim_step on a rank-1 attention-only adapter with no accumulated
gradient (the step has nothing to apply), so its time is submit + queue + worker + long-poll.
"""

import os
import statistics
import threading
import time

import requests

URL = os.environ.get("LORALOOM_URL", "http://127.0.0.1:8000")
H = {"X-API-Key": os.environ.get("TINKER_API_KEY", "tml-overhead")}
N = int(os.environ.get("N", "300"))


def post(s, path, body):
    r = s.post(URL + path, json=body, headers=H, timeout=60)
    r.raise_for_status()
    return r.json()


def result(s, rid):
    while True:
        r = post(s, "/api/v1/retrieve_future", {"request_id": rid})
        if r.get("type") != "try_again":
            return r


def new_run(s, lora_config):
    """A new training run of the served model with `lora_config`: its id."""
    caps = s.get(URL + "/api/v1/get_server_capabilities", headers=H).json()
    model = caps["supported_models"][0]["model_name"]
    session = post(s, "/api/v1/create_session", {})["session_id"]
    p = post(s, "/api/v1/create_model", {"session_id": session, "base_model": model,
                                         "lora_config": lora_config})
    return result(s, p["request_id"])["model_id"]


def main():
    s = requests.Session()
    model_id = new_run(s, {"rank": 1, "train_mlp": False, "train_unembed": False})
    times = []
    for _ in range(N):
        t = time.perf_counter()
        rid = post(s, "/api/v1/optim_step", {"model_id": model_id, "adam_params": {}})["request_id"]
        result(s, rid)
        times.append(time.perf_counter() - t)
    times.sort()
    p50, p99 = statistics.median(times), times[int(0.99 * (len(times) - 1))]
    print(f"trivial future round trip over {N}: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")

    done = post(s, "/api/v1/optim_step", {"model_id": model_id, "adam_params": {}})["request_id"]
    result(s, done)
    count, threads, per = [0], 8, N * 5

    def hammer():
        local = requests.Session()
        for _ in range(per):
            post(local, "/api/v1/retrieve_future", {"request_id": done})
        count[0] += per

    t = time.perf_counter()
    ws = [threading.Thread(target=hammer) for _ in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    secs = time.perf_counter() - t
    print(f"retrieve_future on a finished future: {count[0] / secs:.0f} requests/s ({threads} client threads, "
          f"Python requests clients on the same 2 cores)")


if __name__ == "__main__":
    main()
