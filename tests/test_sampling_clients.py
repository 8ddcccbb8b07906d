"""Sampling clients as the SDK runs them at scale: one long poll per client for all its requests
(`/api/v1/retrieve_futures`, the client config's `sample_use_retrieve_futures`), and copies of a
client sent to other processes numbered by the server (`/api/v1/join_sampling_session`), so
their requests never share a `seq_id` or a completion feed."""

import os
import pickle
import subprocess
import sys
import time

import requests
import tinker
from tinker import types

from conftest import ALICE, BOB, MODEL_NAME, TWO_TENANTS, Server

PROMPTS = [[1, 504, 3151, 42 + i] for i in range(12)]


def post(srv, path, body, key=ALICE):
    return requests.post(srv.url + path, json=body, headers={"X-API-Key": key}, timeout=60)


def greedy(n=6):
    return types.SamplingParams(max_tokens=n, temperature=0.0, stop=[])


def sample_sync(srv, session_id, prompt, n=6):
    """The same prompt through the synchronous route (it reports to no client's feed)."""
    r = post(srv, "/api/v1/sample", {
        "sampling_session_id": session_id,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"max_tokens": n, "temperature": 0.0, "stop": []},
    })
    assert r.status_code == 200, r.text
    return r.json()["sequences"][0]["tokens"]


def chunked(prompt):
    return types.ModelInput.from_ints(prompt)


def future_gone(srv, request_id, timeout=20.0):
    """Whether the server forgot `request_id` within `timeout` (after its client reported it
    retrieved on its next poll)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = post(srv, "/api/v1/retrieve_future", {"request_id": request_id})
        if r.status_code == 404:
            return True
        time.sleep(0.2)
    return False


def test_sdk_clients_and_their_clones_sample_through_one_poll_each(tmp_path):
    srv = Server(tmp_path, *TWO_TENANTS, "--sample-poller", "true")
    try:
        config = post(srv, "/api/v1/client/config", {}).json()
        assert config["sample_use_retrieve_futures"] is True
        assert config["sample_join_sampling_session"] is True
        sc = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        sampler = sc.create_sampling_client(base_model=MODEL_NAME).result(timeout=60)
        session_id = sampler._sampling_session_id
        expected = [sample_sync(srv, session_id, p) for p in PROMPTS]

        # Twelve requests in flight at once from one client: each result reaches its own caller.
        futures = [sampler.sample(chunked(p), 1, greedy()) for p in PROMPTS]
        results = [f.result(timeout=120) for f in futures]
        assert [r.sequences[0].tokens for r in results] == expected
        assert sampler._futures_poller is not None, "the SDK polled the session's feed"
        # Once fetched, the client reports them retrieved and the server forgets them.
        request_ids = [r.sequences[0].sequence_id.rsplit(":", 1)[0] for r in results]
        assert all(future_gone(srv, rid) for rid in request_ids)
        # Every completion the poller heard of had its waiter (none of the synchronous ones).
        assert sampler._futures_poller._completions == {}

        # Copies sent elsewhere ask for their clone id before their first sample: 1, 2, ...
        first = pickle.loads(pickle.dumps(sampler))
        second = pickle.loads(pickle.dumps(sampler))
        assert first._cloned_sampler_id is None
        got = [
            c.sample(chunked(PROMPTS[i]), 1, greedy()).result(timeout=120).sequences[0].tokens
            for i, c in enumerate([first, second])
        ]
        assert (first._cloned_sampler_id, second._cloned_sampler_id) == (1, 2)
        assert got == expected[:2]
        # Their requests are numbered in their own block, and report to their own feed: the
        # clones' pollers saw them (else .result() above would have timed out).
        assert first._request_id_counter == 1_000_000_001

        # A copy in another process, from a handle (no pickle). The script leaves by os._exit once
        # it has printed: the SDK's background threads sometimes abort the interpreter's own
        # shutdown (SIGABRT after the output, seen 2 runs in 6), which says nothing of the server.
        handle = sampler.get_sampler_handle()
        script = (
            "import os, sys, tinker; from tinker import types;"
            "c = tinker.SamplingClient.from_sampler_handle(sys.argv[1], api_key=sys.argv[2]);"
            "r = c.sample(types.ModelInput.from_ints(eval(sys.argv[3])), 1,"
            " types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result(timeout=120);"
            "print(c._cloned_sampler_id, r.sequences[0].tokens, flush=True);"
            "os._exit(0)"
        )
        env = {"TINKER_BASE_URL": srv.url}
        out = subprocess.run(
            [sys.executable, "-c", script, handle, ALICE, repr(PROMPTS[3])],
            capture_output=True, text=True, timeout=180,
            env={**os.environ, **env},
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == "3", out.stdout
        assert out.stdout.strip().endswith(str(expected[3])), out.stdout

        # Another tenant can neither join nor poll Alice's session.
        r = post(srv, "/api/v1/join_sampling_session", {"sampling_session_id": session_id}, key=BOB)
        assert r.status_code == 404, r.text
        r = post(srv, "/api/v1/retrieve_futures", {
            "target": {"type": "sampling_session", "sampling_session_id": session_id},
            "timeout": 0,
        }, key=BOB)
        assert r.status_code == 404, r.text
    finally:
        srv.stop()

    # Clone ids are never handed out twice, restarts included (the poller is off by default).
    srv = Server(tmp_path, *TWO_TENANTS)
    try:
        r = post(srv, "/api/v1/join_sampling_session", {"sampling_session_id": session_id})
        assert r.status_code == 200, r.text
        assert r.json() == {"type": "join_sampling_session", "client_counter": 4}
        config = post(srv, "/api/v1/client/config", {}).json()
        assert config["sample_use_retrieve_futures"] is False
        assert config["sample_join_sampling_session"] is True
    finally:
        srv.stop()


def asample(srv, session_id, seq_id, max_tokens):
    r = post(srv, "/api/v1/asample", {
        "sampling_session_id": session_id, "seq_id": seq_id, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 504, 3151]}]},
        "sampling_params": {"max_tokens": max_tokens, "stop": [], "temperature": 1.0, "seed": 1},
    })
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def poll(srv, session_id, clone=0, cursor=0, timeout=0, retrieved=()):
    r = post(srv, "/api/v1/retrieve_futures", {
        "target": {"type": "sampling_session", "sampling_session_id": session_id,
                   "cloned_sampler_id": clone},
        "prev_cursor": cursor, "timeout": timeout, "retrieved_request_ids": list(retrieved),
    })
    assert r.status_code == 200, r.text
    return r.json()


def test_the_feed_protocol_on_the_wire(tmp_path):
    srv = Server(tmp_path, *TWO_TENANTS, "--long-poll-secs", "2")
    try:
        session = post(srv, "/api/v1/create_session", {}).json()["session_id"]
        r = post(srv, "/api/v1/create_sampling_session",
                 {"session_id": session, "sampling_session_seq_id": 0, "base_model": MODEL_NAME})
        sid = r.json()["sampling_session_id"]

        # Clone 2 numbers its requests from 2e9: its completion goes to its own feed only.
        done = asample(srv, sid, 2_000_000_005, 4)
        first = poll(srv, sid, clone=2, timeout=60)
        while not first["completions"]:  # long polls answer within 2 s here
            first = poll(srv, sid, clone=2, timeout=60)
        assert first["completions"] == [{"state": "finished", "request_id": done}]
        assert poll(srv, sid, clone=0)["completions"] == []
        # With no timeout (or a huge one) a poll of an idle feed waits out the server's long
        # poll (2 s here) and answers nothing new.
        for extra in [{}, {"timeout": 1e20}]:
            started = time.time()
            r = post(srv, "/api/v1/retrieve_futures", {
                "target": {"type": "sampling_session", "sampling_session_id": sid,
                           "cloned_sampler_id": 9}, "prev_cursor": 0, **extra})
            assert r.status_code == 200 and r.json() == {"completions": [], "cursor": 0}, r.text
            assert time.time() - started >= 1.5
        # Seen (at or before the cursor sent) is not answered again.
        again = poll(srv, sid, clone=2, cursor=first["cursor"])
        assert again == {"completions": [], "cursor": first["cursor"]}
        # The result is read as any future's; reported retrieved, it is forgotten.
        result = post(srv, "/api/v1/retrieve_future", {"request_id": done}).json()
        assert len(result["sequences"][0]["tokens"]) == 4, result
        poll(srv, sid, clone=2, cursor=first["cursor"], retrieved=[done])
        assert post(srv, "/api/v1/retrieve_future", {"request_id": done}).status_code == 404

        # A cancelled request is reported failed; its error is read with retrieve_future.
        long = asample(srv, sid, 5, 4000)
        assert post(srv, "/api/v1/cancel_future", {"request_id": long}).json()["cancelled"]
        failed = poll(srv, sid, timeout=60)
        while not failed["completions"]:
            failed = poll(srv, sid, timeout=60)
        assert failed["completions"] == [{"state": "failed", "request_id": long}]
        error = post(srv, "/api/v1/retrieve_future", {"request_id": long}).json()
        assert error.get("error_type") == "cancelled", error

        # A request running when the server stops is queued again after the restart (the job
        # journal kept it), not failed: cancelled there, it is reported so after the cursor
        # its client last saw (or finished, had it already).
        running = asample(srv, sid, 6, 4000)
        time.sleep(0.5)
        cursor = failed["cursor"]
    finally:
        srv.stop()
    srv = Server(tmp_path, *TWO_TENANTS, "--long-poll-secs", "2")
    try:
        post(srv, "/api/v1/cancel_future", {"request_id": running})
        reported, deadline = [], time.time() + 300
        after = {"cursor": cursor}
        while not any(c["request_id"] == running for c in reported):
            assert time.time() < deadline, reported
            after = poll(srv, sid, cursor=after["cursor"], timeout=30)
            reported += after["completions"]
        assert after["cursor"] > cursor
        again = post(srv, "/api/v1/retrieve_future", {"request_id": running}).json()
        assert again.get("error_type") == "cancelled" or len(again["sequences"][0]["tokens"]) == 4000, again

        # Bad polls are 400s naming the field; an unknown session is a 404.
        target = {"type": "sampling_session", "sampling_session_id": sid}
        for body, field in [
            ({"target": target, "timeout": -1}, "timeout"),
            ({"target": {**target, "cloned_sampler_id": -1}}, "target.cloned_sampler_id"),
            ({"target": {**target, "type": "model"}}, "target.type"),
            ({"target": target, "prev_cursor": -5}, "prev_cursor"),
            ({"prev_cursor": 0}, "target"),
        ]:
            r = post(srv, "/api/v1/retrieve_futures", body)
            assert r.status_code == 400 and field in r.text, (body, r.text)
        r = post(srv, "/api/v1/retrieve_futures",
                 {"target": {**target, "sampling_session_id": "nope"}, "timeout": 0})
        assert r.status_code == 404, r.text
        r = post(srv, "/api/v1/join_sampling_session", {"sampling_session_id": "nope"})
        assert r.status_code == 404, r.text
        assert requests.get(srv.url + "/api/v1/healthz", timeout=10).ok
    finally:
        srv.stop()
