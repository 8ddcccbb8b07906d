"""Publishing and copying checkpoints through the SDK: a published checkpoint is readable by
every tenant (loaded into a run, sampled, copied) and changed by none but its owner; a copy
lives on when its source is deleted or unpublished, and loads the same weights."""

import pytest
import requests
import tinker
from tinker import types

from conftest import ALICE, BOB, TWO_TENANTS, MODEL_NAME, Server
from test_sdk import PAIRS, train_on_pairs



@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("publish"), *TWO_TENANTS)
    yield s
    s.stop()


def greedy(sampler, tokenizer):
    prompt = types.ModelInput.from_ints(tokenizer(PAIRS[2][0]).input_ids)
    params = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    return sampler.sample(prompt, num_samples=1, sampling_params=params).result().sequences[0].tokens


def test_publish_then_others_read_but_never_write_and_copies_outlive_their_source(srv, tokenizer):
    alice = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
    tc = alice.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=5).result()
    train_on_pairs(tc, tokenizer, steps=3, learning_rate=3e-3)
    state = tc.save_state("shared").result().path
    weights = tc.save_weights_for_sampler("shared-sampler").result().path
    expected = greedy(alice.create_sampling_client(model_path=weights), tokenizer)

    rest_a = tinker.RestClient(base_url=srv.url, api_key=ALICE)
    rest_b = tinker.RestClient(base_url=srv.url, api_key=BOB)
    bob = tinker.ServiceClient(base_url=srv.url, api_key=BOB)
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=weights).sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)).result()

    rest_a.publish_checkpoint_from_tinker_path(weights).result()
    rest_a.publish_checkpoint_from_tinker_path(state).result()
    # Already public: 409, as the SDK documents (sent raw: the SDK retries 409s for minutes).
    run, kind, name = weights.removeprefix("tinker://").split("/")
    again = requests.post(f"{srv.url}/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/publish",
                          headers={"X-API-Key": ALICE})
    assert again.status_code == 409, again.text
    listed = {c.tinker_path: c for c in rest_a.list_user_checkpoints().result().checkpoints}
    assert listed[weights].public and listed[state].public

    # Bob reads: samples it, trains from it, copies it.
    assert greedy(bob.create_sampling_client(model_path=weights), tokenizer) == expected
    bob_tc = bob.create_training_client_from_state(state).result()
    assert greedy(bob_tc.save_weights_and_get_sampling_client().result(), tokenizer) == expected
    assert rest_b.get_weights_info_by_tinker_path(state).result().lora_rank == 4
    bobs_copy = rest_b.copy_weights(weights, "bobs-archive").result()
    assert bobs_copy != weights and bobs_copy.endswith("/sampler_weights/shared-sampler")
    # ... but never writes.
    for attempt in (lambda: rest_b.delete_checkpoint_from_tinker_path(weights),
                    lambda: rest_b.unpublish_checkpoint_from_tinker_path(weights),
                    lambda: rest_b.set_checkpoint_ttl_from_tinker_path(weights, 7200)):
        with pytest.raises(tinker.NotFoundError):
            attempt().result()
    assert weights not in {c.tinker_path for c in rest_b.list_user_checkpoints().result().checkpoints}

    # Alice's own copy, with a TTL, into a project; then the source goes away.
    mine = rest_a.copy_weights(state, "archive", ttl_seconds=7200).result()
    copied = {c.tinker_path: c for c in rest_a.list_user_checkpoints().result().checkpoints}[mine]
    assert copied.expires_at is not None and not copied.public
    rest_a.unpublish_checkpoint_from_tinker_path(weights).result()
    rest_a.delete_checkpoint_from_tinker_path(weights).result()
    rest_a.delete_checkpoint_from_tinker_path(state).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=weights).sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)).result()
    assert greedy(bob.create_sampling_client(model_path=bobs_copy), tokenizer) == expected
    restored = alice.create_training_client_from_state(mine).result()
    assert greedy(restored.save_weights_and_get_sampling_client().result(), tokenizer) == expected
    # A copy needs a destination.
    r = requests.post(srv.url + "/api/v1/copy_weights", headers={"X-API-Key": ALICE},
                      json={"source_path": mine})
    assert r.status_code == 400 and r.json()["field"] == "destination_project_id", r.text

    # All of it is in Alice's audit log (`AdminClient.get_audit_log`), Bob's reads naming him.
    session = rest_a.list_sessions(limit=1).result().sessions[0]
    rest_a.assign_session_project(session, "audited").result()
    log = tinker.AdminClient(base_url=srv.url, api_key=ALICE).get_audit_log().result().entries
    assert [e.timestamp for e in log] == sorted(e.timestamp for e in log)
    seen = [(e.event, e.event_details.get("tinker_path"), e.event_details.get("actor"),
             e.event_details.get("purpose") or e.event_details.get("reason")) for e in log]
    expected_order = [
        ("checkpoint_created", weights, "alice", None),
        ("checkpoint_published", weights, "alice", None),
        ("checkpoint_read", weights, "bob", "load"),
        ("checkpoint_read", state, "bob", "load"),
        ("checkpoint_read", state, "bob", "weights_info"),
        ("checkpoint_read", weights, "bob", "copy"),
        ("checkpoint_created", mine, "alice", None),
        ("checkpoint_unpublished", weights, "alice", None),
        ("checkpoint_deleted", weights, "alice", "requested"),
        ("checkpoint_deleted", state, "alice", "requested"),
    ]
    positions = [seen.index(e) for e in expected_order]
    assert positions == sorted(positions), seen
    created = next(e for e in log if e.event == "checkpoint_created" and e.tinker_path == mine)
    assert created.event_details["copied_from"] == state and created.model_id == mine.split("/")[2]
    # Bob read nothing else of hers, and Alice's own reads are not logged.
    assert {s[2] for s in seen if s[0] == "checkpoint_read"} == {"bob"}
    assert all(s[2] == "alice" for s in seen if s[0] != "checkpoint_read" and not s[0].startswith("organization_")), seen
    projects = tinker.AdminClient(base_url=srv.url, api_key=ALICE).get_audit_log(
        event_type="projects").result().entries
    assert [(e.event, e.event_details["project_id"], e.event_details["session_id"]) for e in projects] \
        == [("project_session_assigned", "audited", session)]
    # Bob's log holds his own checkpoints only; another day's log is empty.
    bobs_log = tinker.AdminClient(base_url=srv.url, api_key=BOB).get_audit_log().result().entries
    assert bobs_copy in {e.tinker_path for e in bobs_log}
    assert not {weights, state, mine} & {e.tinker_path for e in bobs_log}
    from datetime import date
    assert tinker.AdminClient(base_url=srv.url, api_key=ALICE).get_audit_log(
        day=date(2000, 1, 1)).result().entries == []
    for query, field in [({"event_type": "everything"}, "event_type"), ({"day": "2026-02-30"}, "day")]:
        r = requests.get(srv.url + "/api/v1/audit", params=query, headers={"X-API-Key": ALICE})
        assert r.status_code == 400 and r.json()["field"] == field, r.text
    alice.close("success").result()
    bob.close("success").result()


def test_inflight_samplers_follow_the_runs_latest_inflight_save(srv, tokenizer):
    """`kind="inflight"`: every inflight sampling client of a run samples the weights of the
    run's latest inflight save (as a snapshot of those weights does); snapshots stay fixed."""
    sc = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=9).result()
    first = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    before = greedy(first, tokenizer)
    assert greedy(snapshot, tokenizer) == before
    train_on_pairs(tc, tokenizer, steps=6, learning_rate=5e-3)
    second = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    now = greedy(tc.save_weights_and_get_sampling_client().result(), tokenizer)
    assert now != before, "training changed the greedy answer"
    assert greedy(second, tokenizer) == now
    assert greedy(first, tokenizer) == now, "the earlier inflight client moved to the new weights"
    assert greedy(snapshot, tokenizer) == before, "a snapshot never moves"
    r = requests.post(srv.url + "/api/v1/save_weights_for_sampler", headers={"X-API-Key": ALICE},
                      json={"model_id": tc.model_id, "sampling_session_seq_id": 9, "kind": "eventual"})
    assert r.status_code == 400 and r.json()["field"] == "kind", r.text
    sc.close("success").result()
