"""Retries replay the first attempt: the SDK keeps one `X-Idempotency-Key` across its retries of a
request, so a request resent after its response was lost must not do its work twice."""

import requests

import test_bad_input as bad_input
from conftest import ALICE, BOB, MODEL_NAME


def post(server, path, body, key=None, api_key=ALICE):
    headers = {"X-API-Key": api_key}
    if key is not None:
        headers["X-Idempotency-Key"] = key
    return requests.post(server.url + path, json=body, headers=headers)


def result(server, promise, api_key=ALICE):
    r = post(server, "/api/v1/retrieve_future", {"request_id": promise["request_id"]}, api_key=api_key)
    assert r.status_code == 200, r.text
    return r.json()


def fb_body(model_id):
    return bad_input.fb_body(model_id, [1, 2, 3, 4], [2, 3, 4, 5], [1.0] * 4)


def test_a_resent_request_replays_its_first_response_and_runs_once(keyed_server):
    s = keyed_server
    session = post(s, "/api/v1/create_session", {}, key="sess-1").json()["session_id"]
    assert post(s, "/api/v1/create_session", {}, key="sess-1").json()["session_id"] == session
    create = {"session_id": session, "base_model": MODEL_NAME, "lora_config": {"rank": 4}}
    first = post(s, "/api/v1/create_model", create, key="create-1")
    again = post(s, "/api/v1/create_model", create, key="create-1")
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json() and again.headers.get("x-idempotent-replay") == "true"
    model_id = result(s, first.json())["model_id"]

    # forward_backward resent: the gradient is accumulated once (the same future answers both).
    fb = post(s, "/api/v1/forward_backward", fb_body(model_id), key="fb-1").json()
    assert post(s, "/api/v1/forward_backward", fb_body(model_id), key="fb-1").json() == fb
    result(s, fb)
    # optim_step resent: the run steps once; a new key steps again.
    step = {"model_id": model_id, "adam_params": {"learning_rate": 1e-3}}
    a = post(s, "/api/v1/optim_step", step, key="opt-1").json()
    b = post(s, "/api/v1/optim_step", step, key="opt-1").json()
    assert a == b
    assert result(s, a)["metrics"]["optimizer_step"] == 1
    c = post(s, "/api/v1/optim_step", step, key="opt-2").json()
    assert c["request_id"] != a["request_id"]
    assert result(s, c)["metrics"]["optimizer_step"] == 2
    # Without a key nothing is replayed.
    d = post(s, "/api/v1/optim_step", step).json()
    assert result(s, d)["metrics"]["optimizer_step"] == 3


def test_keys_are_per_tenant_and_4xx_answers_are_replayed(keyed_server):
    s = keyed_server
    alice = post(s, "/api/v1/create_session", {}, key="shared-key").json()["session_id"]
    bob = post(s, "/api/v1/create_session", {}, key="shared-key", api_key=BOB).json()["session_id"]
    assert alice != bob
    # A 4xx is the answer to that request: replayed as is.
    bad = {"model_id": "nope", "adam_params": {}}
    r1 = post(s, "/api/v1/optim_step", bad, key="bad-1")
    r2 = post(s, "/api/v1/optim_step", bad, key="bad-1")
    assert r1.status_code == r2.status_code == 404 and r1.json() == r2.json()


def test_a_resent_numbered_body_runs_once_without_a_key(keyed_server):
    """A client that sends no idempotency key is still safe to retry: the SDK numbers every
    request (`seq_id`, `model_seq_id`), and the same numbered body again is a resend."""
    s = keyed_server
    session = post(s, "/api/v1/create_session", {}).json()["session_id"]
    create = {"session_id": session, "model_seq_id": 0, "base_model": MODEL_NAME,
              "lora_config": {"rank": 4}}
    first = post(s, "/api/v1/create_model", create)
    again = post(s, "/api/v1/create_model", create)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json() and again.headers.get("x-idempotent-replay") == "true"
    model_id = result(s, first.json())["model_id"]

    fb = dict(fb_body(model_id), seq_id=1)
    a = post(s, "/api/v1/forward_backward", fb).json()
    assert post(s, "/api/v1/forward_backward", fb).json() == a
    result(s, a)
    step = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
    a = post(s, "/api/v1/optim_step", step).json()
    assert post(s, "/api/v1/optim_step", step).json() == a
    assert result(s, a)["metrics"]["optimizer_step"] == 1
    # The next number is new work; so is the same number with other contents (a client that
    # numbers afresh); and the same body from another tenant is that tenant's own request.
    b = post(s, "/api/v1/optim_step", dict(step, seq_id=3)).json()
    assert result(s, b)["metrics"]["optimizer_step"] == 2
    c = post(s, "/api/v1/optim_step", dict(step, adam_params={"learning_rate": 2e-3})).json()
    assert result(s, c)["metrics"]["optimizer_step"] == 3
    theirs = post(s, "/api/v1/optim_step", step, api_key=BOB)
    assert theirs.status_code == 404, theirs.text
