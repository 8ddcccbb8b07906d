"""Nothing acknowledged is lost: kill -9 and SIGTERM, then a restart on the same data dir."""

import signal
import time

import pytest
import requests

from conftest import MODEL_NAME, Server

H = {"X-API-Key": "tml-durable"}


def call(srv, path, body):
    r = requests.post(srv.url + path, json=body, headers=H, timeout=60)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


def result(srv, request_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = call(srv, "/api/v1/retrieve_future", {"request_id": request_id})
        if r.get("type") != "try_again":
            return r
    raise AssertionError(f"future {request_id} did not finish")


def fb(model_id, n=1, length=32, forward_only=False, shift=0):
    data = []
    for i in range(n):
        toks = [(i * 37 + j * 11 + shift) % 4000 + 100 for j in range(length + 1)]
        data.append({
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": toks[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": toks[1:], "dtype": "int64"},
                               "weights": {"data": [1.0] * length, "dtype": "float32"}},
        })
    return {"model_id": model_id, "forward_only": forward_only,
            "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"}}


def new_run(srv, rank=8, seed=1):
    s = call(srv, "/api/v1/create_session", {})["session_id"]
    p = call(srv, "/api/v1/create_model", {"session_id": s, "base_model": MODEL_NAME,
                                           "lora_config": {"rank": rank, "seed": seed}})
    assert result(srv, p["request_id"])["model_id"] == p["model_id"]
    return s, p["model_id"]


def submit_step(srv, model_id):
    """An optim_step at lr 1e-2 submitted: its request id."""
    return call(srv, "/api/v1/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}})["request_id"]


def step(srv, model_id):
    f = call(srv, "/api/v1/forward_backward", fb(model_id))
    o = submit_step(srv, model_id)
    return result(srv, f["request_id"]), result(srv, o), f["request_id"]


def forward_loss(srv, model_id):
    f = call(srv, "/api/v1/forward_backward", fb(model_id, forward_only=True, shift=5))
    return result(srv, f["request_id"])["metrics"]["loss:sum"]


def test_kill_9_mid_training_loses_nothing_acknowledged(tmp_path):
    srv = Server(tmp_path)
    try:
        session, model = new_run(srv)
        first_fb, _, first_fb_id = step(srv, model)
        step(srv, model)
        saved = result(srv, call(srv, "/api/v1/save_weights", {"model_id": model, "path": "ck1"})["request_id"])
        path = saved["path"]
        loss_at_ck = forward_loss(srv, model)
        step(srv, model)
        loss_acknowledged = forward_loss(srv, model)
        # Work in flight when the process dies, and a create from the checkpoint queued behind it.
        in_flight = [call(srv, "/api/v1/forward_backward", fb(model, n=8, length=128))["request_id"] for _ in range(4)]
        create = call(srv, "/api/v1/load_weights", {"session_id": session, "model_seq_id": 50, "path": path,
                                                    "optimizer": True})
    finally:
        srv.proc.kill()
        srv.proc.wait()
        srv.log.close()

    srv = Server(tmp_path)
    try:
        runs = requests.get(srv.url + "/api/v1/training_runs", headers=H).json()["training_runs"]
        # The create queued at the kill ran after the restart (the journal kept it).
        assert result(srv, create["request_id"])["model_id"] == create["model_id"]
        assert sorted(r["training_run_id"] for r in runs) == sorted([model, create["model_id"]])
        # Its run holds the checkpoint's weights, not fresh ones.
        assert forward_loss(srv, create["model_id"]) == loss_at_ck
        ckpts = requests.get(srv.url + f"/api/v1/training_runs/{model}/checkpoints", headers=H).json()["checkpoints"]
        assert [c["tinker_path"] for c in ckpts] == [path]
        # A finished future returns the same result.
        assert result(srv, first_fb_id) == first_fb
        # In-flight ones ran again after the restart, in order.
        for request_id in in_flight:
            assert "metrics" in result(srv, request_id)
        # The run continues from its last acknowledged step.
        assert forward_loss(srv, model) == loss_acknowledged
        # The checkpoint loads with identical weights into a new run.
        p = call(srv, "/api/v1/load_weights", {"session_id": session, "model_seq_id": 99, "path": path,
                                               "optimizer": True})
        assert result(srv, p["request_id"])["model_id"] == p["model_id"]
        assert forward_loss(srv, p["model_id"]) == loss_at_ck
        # And the old session still works.
        call(srv, "/api/v1/session_heartbeat", {"session_id": session})
    finally:
        srv.stop()


def wait_running(srv):
    deadline = time.time() + 60
    while requests.get(srv.url + "/api/model-stats", headers=H).json()["running"] == 0:
        assert time.time() < deadline
        time.sleep(0.05)


def test_sigterm_drains_the_queue_keeps_pending_gradients_and_exits_0(tmp_path):
    """A graceful restart loses nothing a client waits for: the jobs queued at SIGTERM run
    before the server exits (their results wait in the store), and gradients acknowledged
    without their optimizer step are in the run's snapshot, so that step works after the
    restart. Both runs end where a run that never restarted ends, bit for bit (same kernels,
    same order, gradients and moments saved as f32)."""
    # A drain long enough for a loaded machine: this test is about what a drain keeps.
    srv = Server(tmp_path, "--drain-secs", "600")
    try:
        _, control = new_run(srv)
        _, drained = new_run(srv)
        _, pending = new_run(srv)
        _, busy = new_run(srv)
        for model in (control, drained, pending):
            step(srv, model)
        step(srv, control)
        want = forward_loss(srv, control)
        # `pending`: gradients acknowledged, no step asked for yet.
        assert "metrics" in result(srv, call(srv, "/api/v1/forward_backward", fb(pending))["request_id"])
        # `drained`: a step queued behind a long batch of another run when the signal comes.
        long_job = call(srv, "/api/v1/forward_backward", fb(busy, n=16, length=256))["request_id"]
        wait_running(srv)
        queued_fb = call(srv, "/api/v1/forward_backward", fb(drained))["request_id"]
        queued_step = submit_step(srv, drained)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=300) == 0, srv.output()
    finally:
        srv.stop()

    srv = Server(tmp_path)
    try:
        assert "metrics" in result(srv, long_job)
        assert "metrics" in result(srv, queued_fb)
        done = result(srv, queued_step)
        assert "error" not in done, done
        assert forward_loss(srv, drained) == want
        stepped = result(srv, submit_step(srv, pending))
        assert "error" not in stepped, stepped
        assert forward_loss(srv, pending) == want
    finally:
        srv.stop()


def test_sigterm_with_a_drain_of_0_leaves_the_queue_to_the_restart_and_a_second_signal_ends_a_drain(tmp_path):
    """What a drain does not run is not lost: it stays journaled, unsettled, and the restarted
    server runs it (a sample stopped between tokens starts again)."""
    srv = Server(tmp_path, "--drain-secs", "0")
    try:
        _, model = new_run(srv)
        step(srv, model)
        before = forward_loss(srv, model)
        long_job = call(srv, "/api/v1/forward_backward", fb(model, n=16, length=256))["request_id"]
        queued = submit_step(srv, model)
        wait_running(srv)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=300) == 0, srv.output()
    finally:
        srv.stop()

    srv = Server(tmp_path)
    try:
        assert "metrics" in result(srv, long_job)
        # The step queued at the signal ran after the restart, on the long batch's gradients
        # (kept with the run's snapshot).
        stepped = result(srv, queued)
        assert "error" not in stepped, stepped
        assert forward_loss(srv, model) != before
        # A drain of an hour, ended by a second signal: the sampling request running stops
        # at its next token, at once.
        sampler = result(srv, call(srv, "/api/v1/save_weights_for_sampler",
                                   {"model_id": model, "sampling_session_seq_id": 1})["request_id"])["sampling_session_id"]
    finally:
        srv.stop()
    srv = Server(tmp_path, "--drain-secs", "3600")
    try:
        body = {"sampling_session_id": sampler, "num_samples": 1,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 504, 3437]}]},
                "sampling_params": {"max_tokens": 4000, "temperature": 1.0, "stop": []}}
        running = call(srv, "/api/v1/asample", body)["request_id"]
        wait_running(srv)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert srv.proc.poll() is None, "the drain waits for the running sample"
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0, srv.output()
    finally:
        srv.stop()
    srv = Server(tmp_path)
    try:
        # Queued again: it is running (or about to), not failed, and can be cancelled.
        r = call(srv, "/api/v1/retrieve_future", {"request_id": running})
        assert r.get("type") == "try_again", r
        call(srv, "/api/v1/cancel_future", {"request_id": running})
        assert "cancelled" in result(srv, running)["error"]
    finally:
        srv.stop()


def kill_9(srv):
    srv.proc.kill()
    srv.proc.wait()
    srv.log.close()


def test_kill_9_keeps_loaded_runs_and_the_gradients_a_forward_backward_acknowledged(tmp_path):
    """Gradients acknowledged without their step live in memory only; after kill -9 the
    journal's forward_backward runs again before anything else of its run, so the step works
    and lands where a run that never crashed lands, bit for bit. When the journal cannot give
    them back (here: its row made unreadable), the step is refused, never taken on partial
    gradients."""
    srv = Server(tmp_path)
    try:
        session, model = new_run(srv)
        _, control = new_run(srv)
        _, unreadable = new_run(srv)
        for run in (model, control, unreadable):
            step(srv, run)
        path = result(srv, call(srv, "/api/v1/save_weights", {"model_id": model, "path": "ck"})["request_id"])["path"]
        loss_at_ck = forward_loss(srv, model)
        step(srv, control)
        want = forward_loss(srv, control)
        # A run created from the checkpoint, then killed before its first step.
        p = call(srv, "/api/v1/load_weights", {"session_id": session, "model_seq_id": 7, "path": path,
                                               "optimizer": True})
        loaded = result(srv, p["request_id"])["model_id"]
        # Gradients acknowledged, then killed before the optimizer step.
        acknowledged_id = call(srv, "/api/v1/forward_backward", fb(model))["request_id"]
        acknowledged = result(srv, acknowledged_id)
        lost = call(srv, "/api/v1/forward_backward", fb(unreadable))["request_id"]
        assert "metrics" in result(srv, lost)
    finally:
        kill_9(srv)

    import sqlite3
    db = sqlite3.connect(tmp_path / "loraloom.db")
    with db:
        assert db.execute("UPDATE jobs SET work = '{' WHERE id = ?", (lost,)).rowcount == 1
    db.close()

    srv = Server(tmp_path)
    try:
        assert forward_loss(srv, loaded) == loss_at_ck
        stepped = result(srv, submit_step(srv, model))
        assert "error" not in stepped, stepped
        assert forward_loss(srv, model) == want
        # The forward_backward's result is the one it had (running it again replaced nothing).
        assert result(srv, acknowledged_id) == acknowledged
        refused = result(srv, submit_step(srv, unreadable))
        assert "gradients accumulated before the server restarted were lost" in refused["error"], refused
        # The refusal discarded the partial gradients; training goes on normally.
        fb_out, optim_out, _ = step(srv, unreadable)
        assert "metrics" in fb_out and "metrics" in optim_out, (fb_out, optim_out)
    finally:
        srv.stop()


def test_inflight_sampling_sessions_follow_their_run_after_a_restart(tmp_path):
    """A `kind="inflight"` sampling session keeps following its run's latest inflight save
    after the server restarts (which run it follows is stored with it)."""
    def inflight(srv, model_id, seq):
        p = call(srv, "/api/v1/save_weights_for_sampler",
                  {"model_id": model_id, "sampling_session_seq_id": seq, "kind": "inflight"})
        return result(srv, p["request_id"])["sampling_session_id"]

    def greedy(srv, sampler):
        r = call(srv, "/api/v1/sample", {
            "sampling_session_id": sampler, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 504, 3437, 314, 260]}]},
            "sampling_params": {"max_tokens": 8, "temperature": 0.0, "stop": []}})
        return r["sequences"][0]["tokens"]

    srv = Server(tmp_path)
    _, model = new_run(srv)
    first = inflight(srv, model, 1)
    before = greedy(srv, first)
    srv.stop()
    srv = Server(tmp_path)
    try:
        for _ in range(4):
            step(srv, model)
        latest = inflight(srv, model, 2)
        now = greedy(srv, latest)
        assert now != before, "training changed the greedy answer"
        assert greedy(srv, first) == now, "the inflight session from before the restart moved on"
    finally:
        srv.stop()


@pytest.mark.parametrize("stop", ["sigterm", "kill_9"])
def test_an_sdk_training_loop_and_a_sample_in_flight_go_through_a_restart(tmp_path, stop):
    """What a user's script sees of a restart (SIGTERM, or a crash: kill -9; then the server
    started again on the same port): nothing. The official SDK's loop keeps going with no
    exception (its requests during the downtime are retried), the step whose gradients were
    pending at the signal works, a sample in flight at the signal comes back (drained, or run
    again from the journal), and the run ends exactly where a run that never restarted ends."""
    import threading

    import tinker
    from tinker import types

    def datum(shift):
        toks = [(j * 11 + shift * 7) % 4000 + 100 for j in range(33)]
        return types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                           loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * 32})

    def loss(tc):
        return tc.forward([datum(99)], "cross_entropy").result().metrics["loss:sum"]

    adam = types.AdamParams(learning_rate=1e-2)
    steps = 4
    srv = Server(tmp_path, "--drain-secs", "600")
    port = srv.port
    sc = tinker.ServiceClient(base_url=srv.url, api_key="tml-restart")
    try:
        control = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=5).result()
        for i in range(steps):
            control.forward_backward([datum(i)], "cross_entropy").result()
            control.optim_step(adam).result()
        want = loss(control)
        sampler = control.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints([1, 504, 3437, 314, 260])
        params = types.SamplingParams(max_tokens=48, temperature=1.0, seed=11, stop=[])
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=5).result()

        pending = threading.Event()
        outcome = {}

        def user_loop():
            try:
                for i in range(steps):
                    tc.forward_backward([datum(i)], "cross_entropy").result()
                    if i == 1:
                        outcome["sample"] = sampler.sample(prompt, 1, params)
                        pending.set()
                        time.sleep(1.0)  # the signal comes now, gradients pending
                    tc.optim_step(adam).result()
                outcome["loss"] = loss(tc)
                outcome["tokens"] = outcome["sample"].result().sequences[0].tokens
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                outcome["error"] = repr(e)

        user = threading.Thread(target=user_loop)
        user.start()
        assert pending.wait(timeout=300)
        wait_running(srv)  # the sample (the SDK sends it in the background) is decoding
        if stop == "sigterm":
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(timeout=300) == 0, srv.output()
        else:
            srv.proc.kill()
            srv.proc.wait()
        srv.stop()
        srv = Server(tmp_path, port=port)
        user.join(timeout=600)
        assert not user.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["loss"] == want
        again = sampler.sample(prompt, 1, params).result().sequences[0].tokens
        assert outcome["tokens"] == again and len(again) == 48
    finally:
        sc.close("success")
        srv.stop()


def test_a_retry_after_kill_9_gets_the_first_attempts_future_not_a_second_job(tmp_path):
    """The SDK retries a request whose answer a crash cut off with the same idempotency key.
    The journal keeps the key with the job it ran again, so the retry gets that job's future
    instead of submitting the work twice (twice the gradients, here). A create's retry gets its
    future, and does not make room for a second run: the abandoned run that room would have cost
    stays."""
    limit = ("--max-runs-per-tenant", "4")
    srv = Server(tmp_path, *limit)
    try:
        session, model = new_run(srv)
        _, control = new_run(srv)
        step(srv, control)
        want = forward_loss(srv, control)
        closed, abandoned = new_run(srv)
        r = requests.post(f"{srv.url}/api/v1/sessions/{closed}/finish", json={"reason": {"type": "success"}},
                          headers=H, timeout=60)
        assert r.status_code == 200, r.text
        keyed = dict(H, **{"X-Idempotency-Key": "fb-attempt-1"})
        r = requests.post(srv.url + "/api/v1/forward_backward", json=fb(model), headers=keyed, timeout=60)
        first = r.json()["request_id"]
        assert "metrics" in result(srv, first)
        # A create queued behind work in flight when the process dies.
        for _ in range(2):
            call(srv, "/api/v1/forward_backward", fb(control, n=8, length=128))
        create_keyed = dict(H, **{"X-Idempotency-Key": "create-attempt-1"})
        create_body = {"session_id": session, "model_seq_id": 7, "base_model": MODEL_NAME,
                       "lora_config": {"rank": 8, "seed": 3}}
        r = requests.post(srv.url + "/api/v1/create_model", json=create_body, headers=create_keyed, timeout=60)
        create = r.json()
    finally:
        kill_9(srv)

    srv = Server(tmp_path, *limit)
    try:
        r = requests.post(srv.url + "/api/v1/create_model", json=create_body, headers=create_keyed, timeout=60)
        assert r.status_code == 200 and r.json()["request_id"] == create["request_id"], r.text
        assert result(srv, create["request_id"])["model_id"] == create["model_id"]
        runs = requests.get(srv.url + "/api/v1/training_runs", headers=H).json()["training_runs"]
        assert abandoned in [r["training_run_id"] for r in runs]
        r = requests.post(srv.url + "/api/v1/forward_backward", json=fb(model), headers=keyed, timeout=60)
        assert r.status_code == 200 and r.json()["request_id"] == first, r.text
        # Another key is another request.
        other = dict(H, **{"X-Idempotency-Key": "fb-attempt-2"})
        r = requests.post(srv.url + "/api/v1/forward_backward", json=fb(model, forward_only=True),
                          headers=other, timeout=60)
        assert r.json()["request_id"] != first
        stepped = result(srv, submit_step(srv, model))
        assert "error" not in stepped, stepped
        # The forward_backward's gradients were rebuilt, not lost: the run is where the control
        # run is. Within 1e-6 relative, not bit for bit: the rebuilt pass may run in another batch
        # than the control's (here with the forward-only request), and on some CPUs (an AMD EPYC)
        # that changes the sums' last bits. Twice the gradients would not show in the loss
        # (Adam's first step is scale-free): the request ids above show the retry got the first
        # attempt's job.
        got = forward_loss(srv, model)
        assert abs(got - want) <= 1e-6 * abs(want), (got, want)
    finally:
        srv.stop()
