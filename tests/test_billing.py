"""Metered usage through the official SDK's AdminClient and `tinker billing` CLI: each tenant
sees the tokens its sessions trained and sampled, the checkpoints it wrote and their storage,
per UTC hour and attributed to session and project; never another tenant's; and all of it
survives a checkpoint's deletion and a restart."""

import os
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import pytest
import requests
import tinker
from tinker import types

from conftest import ALICE, BOB, MODEL_NAME, TWO_TENANTS, Server


def hour_floor(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def window(since: datetime):
    """Whole UTC hours from the hour of `since` to the end of the current hour."""
    return hour_floor(since), hour_floor(datetime.now(timezone.utc)) + timedelta(hours=1)


def totals(usage, session=None):
    """Quantities per event type (summed over hours), for one session or all."""
    out = defaultdict(float)
    for event in usage.data:
        if session is not None and event.session_id != session:
            continue
        info = event.event_info
        out[info.type] += getattr(info, "token_count", None) or getattr(info, "count", None) \
            or getattr(info, "gigabyte_hours", 0.0)
    return out


def datum(tokens):
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def test_usage_is_metered_per_tenant_session_and_hour_and_survives_a_restart(tmp_path):
    started = datetime.now(timezone.utc)
    srv = Server(tmp_path, *TWO_TENANTS)
    try:
        sc = tinker.ServiceClient(user_metadata={"experiment": "m1"}, project_id="weaving",
                                  base_url=srv.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        session = tc.model_id.split(":train:")[0]
        # 12 + 7 input tokens through forward_backward, 5 through forward.
        tc.forward_backward([datum(list(range(100, 113))), datum(list(range(200, 208)))],
                            "cross_entropy").result()
        tc.forward([datum(list(range(300, 306)))], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        saved = tc.save_state("metered").result().path
        sampler = tc.save_weights_and_get_sampling_client().result()
        out = sampler.sample(types.ModelInput.from_ints([1, 2, 3, 4, 5, 6]), num_samples=3,
                             sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0,
                                                                  seed=3, stop=[])).result()
        sampled = sum(len(s.tokens) for s in out.sequences)
        assert 3 <= sampled <= 12

        # Bob trains too; Alice never sees it, and Bob sees only his.
        bob = tinker.ServiceClient(base_url=srv.url, api_key=BOB)
        btc = bob.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        btc.forward_backward([datum(list(range(400, 441)))], "cross_entropy").result()

        admin = tinker.AdminClient(base_url=srv.url, api_key=ALICE)
        start, end = window(started)
        usage = admin.get_billing_usage(start, end).result()
        mine = totals(usage, session)
        assert mine["training"] == 12 + 7 + 5
        assert mine["sampling_prefill"] == 6
        assert mine["sampling_sample"] == sampled
        # save_state is a checkpoint; the sampling client's own weights are not listed, not counted.
        assert mine["checkpoint"] == 1
        size = next(c.size_bytes for c in tinker.RestClient(base_url=srv.url, api_key=ALICE)
                    .list_checkpoints(tc.model_id).result().checkpoints
                    if c.tinker_path == saved)
        elapsed_h = (datetime.now(timezone.utc) - started).total_seconds() / 3600
        assert 0 < mine["storage"] <= size / 1e9 * elapsed_h
        assert totals(usage) == mine, "only Alice's own sessions"
        for event in usage.data:
            assert event.user_id == "alice" and event.base_model == MODEL_NAME
            assert event.project_id == "weaving" and event.estimated_cost_usd is None
            assert event.bucket_end - event.bucket_start == timedelta(hours=1)
        assert usage.sessions[session].user_metadata == {"experiment": "m1"}
        # Naive datetimes (the SDK sends them without an offset) are UTC.
        naive = admin.get_billing_usage(start.replace(tzinfo=None), end.replace(tzinfo=None)).result()
        assert totals(naive, session)["training"] == mine["training"]
        bob_usage = tinker.AdminClient(base_url=srv.url, api_key=BOB).get_billing_usage(start, end).result()
        assert dict(totals(bob_usage)) == {"training": 40}

        # Checkpoint storage now, per project.
        storage = admin.get_current_checkpoint_storage_usage().result()
        assert [(i.project_id, i.checkpoint_count, i.size_bytes) for i in storage.data] == \
            [("weaving", 1, size)]
        assert storage.data[0].size_gigabytes == pytest.approx(size / 1e9)
        assert admin.get_current_checkpoint_storage_usage(project_id="other").result().data == []

        # The CLI a user would run.
        env = {**os.environ, "HOME": str(tmp_path), "TINKER_BASE_URL": srv.url, "TINKER_API_KEY": ALICE}
        cli = subprocess.run(
            [sys.executable, "-m", "tinker.cli", "--format", "json", "billing", "usage",
             start.strftime("%Y-%m-%dT%H:%M:%SZ"), end.strftime("%Y-%m-%dT%H:%M:%SZ")],
            env=env, text=True, capture_output=True, timeout=120)
        assert cli.returncode == 0, cli
        assert "sampling_prefill" in cli.stdout

        # Deleting the checkpoint keeps what it metered; new storage stops accruing.
        tinker.RestClient(base_url=srv.url, api_key=ALICE).delete_checkpoint_from_tinker_path(saved).result()
        after_delete = totals(admin.get_billing_usage(start, end).result(), session)
        assert after_delete["checkpoint"] == 1 and after_delete["storage"] >= mine["storage"]
        assert admin.get_current_checkpoint_storage_usage().result().data == []
    finally:
        srv.stop()

    srv = Server(tmp_path, *TWO_TENANTS)
    try:
        admin = tinker.AdminClient(base_url=srv.url, api_key=ALICE)
        again = totals(admin.get_billing_usage(start, end).result(), session)
        assert again == after_delete, "a restart loses no metered usage"
    finally:
        srv.stop()


def test_a_usage_window_is_checked_field_by_field(keyed_server):
    def ask(**params):
        return requests.get(keyed_server.url + "/api/v1/billing/usage/events", params=params,
                            headers={"X-API-Key": ALICE}, timeout=30)

    hour = hour_floor(datetime.now(timezone.utc))
    fmt = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    cases = [
        ({"ending_before": fmt(hour)}, "starting_on"),
        ({"starting_on": fmt(hour).replace(":00:00Z", ":30:00Z"), "ending_before": fmt(hour)}, "starting_on"),
        ({"starting_on": "last tuesday", "ending_before": fmt(hour)}, "starting_on"),
        ({"starting_on": fmt(hour + timedelta(hours=2)), "ending_before": fmt(hour + timedelta(hours=3))},
         "starting_on"),
        ({"starting_on": fmt(hour), "ending_before": fmt(hour)}, "ending_before"),
        ({"starting_on": fmt(hour - timedelta(days=15)), "ending_before": fmt(hour)}, "ending_before"),
    ]
    for params, field in cases:
        r = ask(**params)
        assert r.status_code == 400 and field in r.json()["detail"], (params, r.text)
    ok = ask(starting_on=fmt(hour - timedelta(days=14)), ending_before=fmt(hour))
    assert ok.status_code == 200 and set(ok.json()) >= {"data", "sessions"}, ok.text
    # Without a key there is nothing to see.
    assert requests.get(keyed_server.url + "/api/v1/billing/usage/checkpoints/current",
                        timeout=30).status_code == 401
    with pytest.raises(tinker.BadRequestError):
        tinker.AdminClient(base_url=keyed_server.url, api_key=ALICE).get_billing_usage(
            fmt(hour).replace(":00:00Z", ":15:00Z"), fmt(hour + timedelta(hours=1))).result()
