"""Per-tenant quotas: training runs (--max-runs-per-tenant, which runs of finished or silent
sessions make room under), listed checkpoints by count (--max-checkpoints-per-tenant), sampling
sessions (--max-samplers-per-tenant, whose removal of idle sessions the engine's unit tests
cover), queued jobs (--max-queued-per-tenant, which the client config tells the SDK), resident adapter memory per tenant (--max-resident-bytes-per-tenant) and of all tenants
(--max-resident-bytes); checkpoints saved for one
sampling session are not listed; /api/model-stats shows each tenant its usage against the
limits."""

import time

import pytest
import requests
import tinker

from conftest import MODEL_NAME, Server

KEY = "tml-quotas"


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("quotas"), "--max-checkpoints-per-tenant", "2",
                 "--max-samplers-per-tenant", "2")
    yield srv
    srv.stop()


def test_checkpoint_and_session_limits_are_named_and_usage_is_shown(quota_server):
    sc = tinker.ServiceClient(base_url=quota_server.url, api_key=KEY)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
    first = tc.save_state("first").result().path
    second = tc.save_weights_for_sampler("second").result().path
    with pytest.raises(tinker.PermissionDeniedError) as refused:
        tc.save_state("third").result()
    assert "--max-checkpoints-per-tenant" in str(refused.value)

    # Sampling clients saved on the fly: their checkpoints are not listed and not counted.
    samplers = [tc.save_weights_and_get_sampling_client().result() for _ in range(2)]
    assert len(samplers) == 2
    rest = tinker.RestClient(base_url=quota_server.url, api_key=KEY)
    listed = rest.list_user_checkpoints().result().checkpoints
    assert [c.tinker_path for c in listed] == [second, first], "newest first, ephemeral ones unlisted"
    # A third session within a minute of the others exceeds the limit of 2.
    with pytest.raises(tinker.RequestFailedError) as too_many:
        tc.save_weights_and_get_sampling_client().result()
    assert "--max-samplers-per-tenant" in str(too_many.value)

    usage = requests.get(quota_server.url + "/api/model-stats", headers={"X-API-Key": KEY}).json()["your_usage"]
    assert usage["checkpoints"] == 2 and usage["checkpoints_limit"] == 2, usage
    assert usage["sampling_sessions"] == 2 and usage["runs"] == 1, usage
    assert usage["checkpoint_bytes"] > 0 and usage["checkpoint_bytes_limit"] > 0, usage
    # Deleting one makes room again.
    rest.delete_checkpoint_from_tinker_path(first).result()
    tc.save_state("third").result()


def test_a_tenants_resident_adapters_stay_under_its_memory_limit(tmp_path):
    """--max-resident-bytes-per-tenant: runs beyond it are evicted to disk after each batch and
    train on when used again; a run larger than the limit alone is refused, naming the flag."""
    srv = Server(tmp_path, "--max-resident-bytes-per-tenant", "100M")
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
        datum = tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints([1, 504, 3437, 314]),
            loss_fn_inputs={"target_tokens": [504, 3437, 314, 260], "weights": [1.0] * 4})

        def usage():
            return requests.get(srv.url + "/api/model-stats", headers={"X-API-Key": KEY}).json()["your_usage"]

        def train(tc):
            loss = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
            tc.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()
            return loss

        first = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        losses = [train(first)]
        one = usage()["resident_bytes"]
        assert 0 < one <= 100 << 20 and usage()["resident_bytes_limit"] == 100 << 20, usage()
        with pytest.raises(tinker.PermissionDeniedError) as refused:
            sc.create_lora_training_client(base_model=MODEL_NAME, rank=64).result()
        assert "--max-resident-bytes-per-tenant" in str(refused.value)
        others = [sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result() for _ in range(5)]
        for tc in others:
            train(tc)
            assert usage()["resident_bytes"] <= 100 << 20, usage()
        assert 6 * one > 100 << 20, "the runs would not fit without eviction"
        # The first run was evicted to disk; it reloads and goes on learning.
        losses += [train(first), train(first)]
        assert losses[2] < losses[1] < losses[0], losses
    finally:
        srv.stop()


def test_all_tenants_resident_adapters_stay_under_the_servers_limit_and_the_smaller_tenant_keeps_its_run(tmp_path):
    """--max-resident-bytes: when all tenants' adapters together pass it, the tenant holding the
    most loses its least recently used idle runs (evicted to disk, reloaded when used again);
    a tenant holding less keeps its run, although it is the least recently used of all."""
    other = "tml-other"
    srv = Server(tmp_path, "--max-resident-bytes", "100M", "--api-key", f"q={KEY}", "--api-key", f"o={other}")
    try:
        datum = tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints([1, 504, 3437, 314]),
            loss_fn_inputs={"target_tokens": [504, 3437, 314, 260], "weights": [1.0] * 4})

        def stats(key):
            return requests.get(srv.url + "/api/model-stats", headers={"X-API-Key": key}).json()

        def train(tc):
            loss = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
            tc.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()
            return loss

        small = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
        mine = small.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        losses = [train(mine)]
        one = stats(KEY)["your_usage"]["resident_bytes"]
        assert 0 < one and stats(KEY)["resident_adapter_bytes_limit"] == 100 << 20, stats(KEY)
        big = tinker.ServiceClient(base_url=srv.url, api_key=other)
        theirs = [big.create_lora_training_client(base_model=MODEL_NAME, rank=4).result() for _ in range(5)]
        for tc in theirs:
            train(tc)
            assert stats(other)["resident_adapter_bytes"] <= 100 << 20, stats(other)
            assert stats(KEY)["your_usage"]["resident_bytes"] == one, "the smaller tenant keeps its run"
        assert 6 * one > 100 << 20, "the runs would not fit without eviction"
        metrics = requests.get(srv.url + "/metrics", headers={"X-API-Key": other}).text
        assert f"loraloom_resident_adapter_bytes_limit {100 << 20}" in metrics, metrics
        # Their first run was evicted to disk; it reloads and goes on learning, as does ours.
        first = [train(theirs[0]) for _ in range(2)]
        assert first[1] < first[0], first
        losses += [train(mine), train(mine)]
        assert losses[2] < losses[1] < losses[0], losses
        with pytest.raises(tinker.PermissionDeniedError) as refused:
            small.create_lora_training_client(base_model=MODEL_NAME, rank=64).result()
        assert "--max-resident-bytes " in str(refused.value)
    finally:
        srv.stop()


def test_sessions_per_tenant_forget_the_oldest_empty_ones_then_refuse(tmp_path):
    """--max-sessions-per-tenant: one more session forgets the tenant's oldest session holding
    nothing; when every session holds a run, creating one is a 403 naming the flag."""
    srv = Server(tmp_path, "--max-sessions-per-tenant", "3", "--api-key", f"q={KEY}", "--api-key", "o=tml-other")
    h = {"X-API-Key": KEY}
    try:
        def session():
            r = requests.post(srv.url + "/api/v1/create_session", json={}, headers=h)
            return r

        def run_in(sid):
            p = requests.post(srv.url + "/api/v1/create_model", headers=h, json={
                "session_id": sid, "base_model": MODEL_NAME, "lora_config": {"rank": 4}}).json()
            done = requests.post(srv.url + "/api/v1/retrieve_future", json={"request_id": p["request_id"]},
                                 headers=h).json()
            assert done["model_id"] == p["model_id"], done

        def listed():
            return set(requests.get(srv.url + "/api/v1/sessions?limit=100", headers=h).json()["sessions"])

        a, b, c = (session().json()["session_id"] for _ in range(3))
        run_in(a)
        d = session().json()["session_id"]
        assert listed() == {a, c, d}, "the oldest empty session (b) made room"
        run_in(c)
        run_in(d)
        refused = session()
        assert refused.status_code == 403 and "--max-sessions-per-tenant" in refused.text, refused.text
        usage = requests.get(srv.url + "/api/model-stats", headers=h).json()["your_usage"]
        assert (usage["sessions"], usage["sessions_limit"]) == (3, 3), usage
        other = requests.post(srv.url + "/api/v1/create_session", json={}, headers={"X-API-Key": "tml-other"})
        assert other.status_code == 200, "another tenant is not limited by this one's sessions"
    finally:
        srv.stop()


def test_runs_of_finished_or_silent_sessions_make_room_for_new_ones(tmp_path):
    """At --max-runs-per-tenant, runs no client can use any more are unloaded to make room: those
    of a session its client finished (ServiceClient.close), and those of a session silent for
    --session-timeout-secs whose runs ran no job for as long. A live session keeps its runs (the
    next run is refused, naming both flags); checkpoints of unloaded runs stay."""
    srv = Server(tmp_path, "--max-runs-per-tenant", "2", "--session-timeout-secs", "8")
    h = {"X-API-Key": KEY}

    def call(path, body):
        return requests.post(srv.url + path, json=body, headers=h, timeout=30)

    def new_session():
        r = call("/api/v1/create_session", {"tags": [], "sdk_version": "raw"})
        assert r.ok, r.text
        return r.json()["session_id"]

    def create_run(session_id):
        return call("/api/v1/create_model", {"session_id": session_id, "base_model": MODEL_NAME,
                                             "lora_config": {"rank": 4}})

    def runs():
        listed = requests.get(srv.url + "/api/v1/training_runs", headers=h, timeout=30).json()
        return sorted(r["training_run_id"] for r in listed["training_runs"])

    try:
        first = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
        kept = first.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
        path = kept.save_state("kept").result().path
        first.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
        with pytest.raises(tinker.PermissionDeniedError) as refused:
            first.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
        assert "limit 2" in str(refused.value) and "--session-timeout-secs" in str(refused.value), refused.value
        first_runs = runs()
        assert len(first_runs) == 2, first_runs
        first.close("success").result()

        # The finished session's two runs make room for another client's two.
        second = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
        for _ in range(2):
            second.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
        second_runs = runs()
        assert len(second_runs) == 2 and not set(second_runs) & set(first_runs), (first_runs, second_runs)
        listed = tinker.RestClient(base_url=srv.url, api_key=KEY).list_user_checkpoints().result()
        assert path in [c.tinker_path for c in listed.checkpoints], "an unloaded run's checkpoint stays"
        second.close("success").result()

        # A session that heartbeats keeps its runs; once silent for the timeout, it gives them up.
        live = new_session()
        for _ in range(2):
            assert create_run(live).ok
        assert runs() != second_runs
        other = new_session()
        started = time.monotonic()
        while time.monotonic() - started < 12:
            assert call("/api/v1/session_heartbeat", {"session_id": live}).ok
            r = create_run(other)
            assert r.status_code == 403 and "--session-timeout-secs" in r.text, (r.status_code, r.text)
            time.sleep(2)
        time.sleep(9)
        r = create_run(other)
        assert r.ok, r.text
        assert len(runs()) == 2
    finally:
        srv.stop()


def test_the_sdk_keeps_its_samples_within_the_tenants_queue_limit(tmp_path):
    """RL loops fire many samples at once (the SDK allows 2000 in flight by default). The client
    config tells the SDK the tenant's queue limit, so a burst larger than the limit waits in the
    SDK instead of being refused with 429 and retried: every sample comes back and the server
    refused none."""
    srv = Server(tmp_path, "--max-queued-per-tenant", "4")
    try:
        config = requests.post(srv.url + "/api/v1/client/config", json={}, timeout=30).json()
        assert config["sample_max_concurrent_requests"] == 4, config
        sc = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
        sampler = sc.create_sampling_client(base_model=MODEL_NAME).result()
        prompt = tinker.types.ModelInput.from_ints([1, 2, 3, 4])
        params = tinker.types.SamplingParams(max_tokens=3, temperature=1.0)
        burst = [sampler.sample(prompt, num_samples=1, sampling_params=params) for _ in range(24)]
        for future in burst:
            assert 1 <= len(future.result().sequences[0].tokens) <= 3
        stats = requests.get(srv.url + "/api/model-stats", headers={"X-API-Key": KEY}, timeout=30).json()
        assert stats["done"] >= 24 and stats["refused"] == 0, stats
        metrics = requests.get(srv.url + "/metrics", headers={"X-API-Key": KEY}, timeout=30).text
        assert "loraloom_jobs_refused_total 0" in metrics, metrics
    finally:
        srv.stop()
