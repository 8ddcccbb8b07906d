"""Sampling jobs are bounded: a running one can be cancelled between two tokens (also by the
SDK when its caller abandons the future), one that runs past --max-sample-secs fails
`time_limit`, and meanwhile other requests are served."""

import asyncio
import time

import requests
import tinker

from conftest import MODEL_NAME, Server

import pytest

H = {"X-API-Key": "tml-sampling-limits"}


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("sample-limits"), "--max-sample-secs", "4")
    yield srv
    srv.stop()


def post(srv, path, body):
    return requests.post(srv.url + path, json=body, headers=H, timeout=60)


def asample(srv, max_tokens, num_samples=1):
    r = post(srv, "/api/v1/asample", {
        "base_model": MODEL_NAME, "num_samples": num_samples,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 504, 3151]}]},
        # `stop: []` never stops early: the job decodes all of max_tokens.
        "sampling_params": {"max_tokens": max_tokens, "stop": [], "temperature": 1.0, "seed": 1},
    })
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def outcome(srv, request_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = post(srv, "/api/v1/retrieve_future", {"request_id": request_id}).json()
        if r.get("type") != "try_again":
            return r
    raise AssertionError(f"future {request_id} did not finish")


def test_a_running_sample_is_cancelled_and_others_are_served(limited_server):
    long = asample(limited_server, 4000, num_samples=4)
    time.sleep(1.0)  # let it start decoding (cancelling a queued job works too)
    r = post(limited_server, "/api/v1/cancel_future", {"request_id": long}).json()
    assert r["cancelled"] is True, r
    failed = outcome(limited_server, long, timeout=60)
    assert failed.get("error_type") == "cancelled", failed
    short = outcome(limited_server, asample(limited_server, 4))
    assert len(short["sequences"][0]["tokens"]) == 4, short


def test_sampling_past_the_time_limit_fails_naming_the_flag(limited_server):
    long = asample(limited_server, 4000, num_samples=4)
    failed = outcome(limited_server, long, timeout=120)
    assert failed.get("error_type") == "time_limit", failed
    assert "--max-sample-secs" in failed["error"], failed


def test_a_sample_the_sdk_abandons_is_cancelled_on_the_server(tmp_path):
    """The SDK sends cancel_future for a sampling future its caller gives up on (here a
    timeout), since the server's dynamic config enables it: the job stops within seconds
    instead of decoding 4 x 4000 tokens (minutes on this model) for nobody."""
    srv = Server(tmp_path, "--max-sample-secs", "300")
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key=H["X-API-Key"])
        sampler = sc.create_sampling_client(base_model=MODEL_NAME).result()
        params = tinker.types.SamplingParams(max_tokens=4000, stop=[], temperature=1.0, seed=1)
        prompt = tinker.types.ModelInput.from_ints([1, 504, 3151])

        async def abandon():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sampler.sample(prompt, 4, params), timeout=3.0)

        asyncio.run(abandon())
        deadline = time.time() + 60
        while True:
            stats = requests.get(srv.url + "/api/model-stats", headers=H, timeout=30).json()
            if stats["failed"] == 1 and stats["running"] == 0:
                break
            assert time.time() < deadline, f"the abandoned sample still runs: {stats}"
            time.sleep(0.5)
        sc.close("success").result()
    finally:
        srv.stop()
