"""What this session's API additions cost per request, against their baselines in the same run.

usage: MODEL_DIR=data/models/SmolLM2-135M-Instruct .venv/bin/python scripts/api_overhead.py
       (server from LORALOOM_URL, default 127.0.0.1:8000, serving MODEL_DIR with
       --access-tokens true; key from TINKER_API_KEY, default tml-overhead)

- an authenticated request that does nothing else (`GET /api/v1/training_runs`) presenting the
  API key, against presenting the access token the key is exchanged for (`POST /api/v1/auth/token`);
- a 16-token greedy completion of one short prompt on the base model through the
  OpenAI-compatible route (`/oai/api/v1/completions`, text in and out: encoding, decoding, the
  answer's shape), against the same request through `/api/v1/sample` (token ids in and out).
Each pair is timed alternately, N rounds (N_AUTH 200, N_SAMPLE 30), one client on loopback.
"""

import os
import statistics
import time

import requests
from transformers import AutoTokenizer

URL = os.environ.get("LORALOOM_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("TINKER_API_KEY", "tml-overhead")
N_AUTH = int(os.environ.get("N_AUTH", "200"))
N_SAMPLE = int(os.environ.get("N_SAMPLE", "30"))


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(n, a, b):
    """Medians (ms) of `a` and `b`, run alternately `n` times after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(n):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def main():
    s = requests.Session()
    key = {"X-API-Key": KEY}
    token = {"X-API-Key": s.post(URL + "/api/v1/auth/token", json={}, headers=key).json()["jwt"]}

    def runs(headers):
        return lambda: s.get(URL + "/api/v1/training_runs", headers=headers).raise_for_status()

    k, t = alternate(N_AUTH, runs(key), runs(token))
    print(f"authenticated GET, p50 over {N_AUTH}: API key {k:.3f} ms, access token {t:.3f} ms ({t / k:.2f}x)")

    model = s.get(URL + "/api/v1/get_server_capabilities", headers=key).json()["supported_models"][0]["model_name"]
    prompt = "The capital of France is"
    ids = AutoTokenizer.from_pretrained(os.environ["MODEL_DIR"])(prompt)["input_ids"]

    def oai():
        r = s.post(URL + "/oai/api/v1/completions", headers=key,
                   json={"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        r.raise_for_status()
        assert r.json()["usage"]["prompt_tokens"] == len(ids)

    def native():
        s.post(URL + "/api/v1/sample", headers=key, json={
            "base_model": model, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": ids}]},
            "sampling_params": {"max_tokens": 16, "temperature": 0.0}}).raise_for_status()

    o, nat = alternate(N_SAMPLE, oai, native)
    print(f"16-token greedy completion of a {len(ids)}-token prompt, p50 over {N_SAMPLE}: "
          f"/oai/api/v1/completions {o:.2f} ms, /api/v1/sample {nat:.2f} ms ({o / nat:.2f}x)")


if __name__ == "__main__":
    main()
