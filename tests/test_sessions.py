"""Sessions through the official SDK: what a `ServiceClient` made is listed and searchable under
its session, `close()` ends the session (no new runs in it, heartbeats answer 410), projects
group sessions and filter training runs, and all of it survives a restart."""

import pytest
import requests
import tinker
from tinker import types

from conftest import ALICE, BOB, TWO_TENANTS, MODEL_NAME, Server

# search_sessions is marked experimental in the SDK.
pytestmark = pytest.mark.filterwarnings("ignore::tinker.ExperimentalWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sessions")




def test_blank_tinker_tags_are_dropped(server, monkeypatch):
    """The SDK splits TINKER_TAGS on commas and sends each piece as a tag, so `"rl,"` or an empty
    variable sends a blank one: the session is created without it."""
    for tags in ("rl,,grpo,", ""):
        monkeypatch.setenv("TINKER_TAGS", tags)
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        assert tc.get_info().model_id == tc.model_id


def newest_session(rest):
    return rest.list_sessions(limit=1).result().sessions[0]


def test_sessions_are_listed_searched_moved_and_closed(data_dir):
    srv = Server(data_dir, *TWO_TENANTS)
    try:
        rest = tinker.RestClient(base_url=srv.url, api_key=ALICE)
        sc = tinker.ServiceClient(
            user_metadata={"experiment": "loom-7"}, project_id="weaving",
            display_name="Violet Loom run", base_url=srv.url, api_key=ALICE,
        )
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        tc.save_state("first").result()
        first = newest_session(rest)
        assert tc.model_id.startswith(first + ":")
        info = rest.get_session(first).result()
        assert info.training_run_ids == [tc.model_id]
        assert info.sampler_ids == [sampler._sampling_session_id]
        assert info.user_metadata == {"experiment": "loom-7"} and info.display_name == "Violet Loom run"

        other = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        other_tc = other.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=1).result()
        second = newest_session(rest)
        assert rest.list_sessions().result().sessions[:2] == [second, first]

        # Search: by words of the display name (any case), metadata, project, status; paged.
        def search(**kw):
            return rest.search_sessions(types.SessionSearchRequest(**kw)).result()
        found = search(display_name="loom VIOLET")
        assert [s.session_id for s in found.sessions] == [first]
        summary = found.sessions[0]
        assert summary.project_id == "weaving" and summary.owner == "alice"
        assert summary.status.type == "active" and summary.checkpoints_count == 1
        assert summary.checkpoint_storage_bytes > 0
        assert [s.session_id for s in search(user_metadata={"experiment": "loom-7"}).sessions] == [first]
        assert [s.session_id for s in search(project_ids=["default"]).sessions] == [second]
        page = search(limit=1)
        assert [s.session_id for s in page.sessions] == [second] and page.next_cursor is not None
        rest_page = search(limit=1, cursor=page.next_cursor)
        assert [s.session_id for s in rest_page.sessions] == [first] and rest_page.next_cursor is None

        # Projects group sessions and filter training runs.
        runs = rest.list_training_runs(project_id="weaving").result().training_runs
        assert [r.training_run_id for r in runs] == [tc.model_id]
        rest.assign_session_project(second, "weaving").result()
        runs = rest.list_training_runs(project_id="weaving").result().training_runs
        assert sorted(r.training_run_id for r in runs) == sorted([tc.model_id, other_tc.model_id])
        with pytest.raises(tinker.BadRequestError, match="project_id"):
            rest.assign_session_project(second, "").result()

        # The session's timeline, as a trace Perfetto opens: its run's jobs on the run's track.
        trace = requests.get(rest.export_session_trace(first).result(), timeout=30).json()
        tracks = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
        jobs = [(tracks[e["tid"]], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"]
        assert (tc.model_id, "create_model") in jobs and (tc.model_id, "save_state") in jobs, jobs
        assert all(e["dur"] >= 0 for e in trace["traceEvents"] if e["ph"] == "X")
        assert all(q.startswith(first + ":") for q, _ in jobs), "only this session's jobs"

        # close() ends the session: the first reason stays, nothing new is created in it.
        sc.close("success", detail="done weaving").result()
        finished = search(statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])])
        assert [s.session_id for s in finished.sessions] == [first]
        assert finished.sessions[0].status.detail == "done weaving"
        assert [s.session_id for s in search(statuses=[types.ActiveSessionStatusQuery()]).sessions] == [second]
        h = {"X-API-Key": ALICE}
        again = requests.post(f"{srv.url}/api/v1/sessions/{first}/finish",
                              json={"reason": {"type": "errored"}}, headers=h)
        assert again.status_code == 200, again.text
        beat = requests.post(f"{srv.url}/api/v1/session_heartbeat", json={"session_id": first}, headers=h)
        assert beat.status_code == 410, beat.text
        create = requests.post(f"{srv.url}/api/v1/create_model", headers=h, json={
            "session_id": first, "model_seq_id": 9, "base_model": MODEL_NAME, "lora_config": {"rank": 4}})
        assert create.status_code == 410 and "finished" in create.json()["error"], create.text
        # The session's run itself still takes work (from any client that knows its id).
        step = requests.post(f"{srv.url}/api/v1/optim_step", headers=h,
                             json={"model_id": tc.model_id, "adam_params": {"learning_rate": 1e-3}})
        assert step.status_code == 200, step.text

        # Another tenant sees none of it.
        theirs = tinker.RestClient(base_url=srv.url, api_key=BOB)
        assert theirs.list_sessions().result().sessions == []
        with pytest.raises(tinker.NotFoundError):
            theirs.get_session(first).result()
        with pytest.raises(tinker.NotFoundError):
            theirs.assign_session_project(first, "mine").result()
        with pytest.raises(tinker.NotFoundError):
            theirs.export_session_trace(first).result()
        assert theirs.search_sessions(types.SessionSearchRequest(
            owner=types.AccessibleSearchOwner())).result().sessions == []
        bad = requests.post(f"{srv.url}/api/v1/sessions/{second}/finish",
                            json={"reason": {"type": "bored"}}, headers=h)
        assert bad.status_code == 400 and bad.json()["field"] == "reason.type", bad.text
        other.close("success").result()
    finally:
        srv.stop()

    # A restart keeps every session, its details and its fate.
    srv = Server(data_dir, *TWO_TENANTS)
    try:
        rest = tinker.RestClient(base_url=srv.url, api_key=ALICE)
        assert rest.list_sessions().result().sessions[:2] == [second, first]
        found = rest.search_sessions(types.SessionSearchRequest(session_id=first)).result().sessions
        assert found[0].display_name == "Violet Loom run" and found[0].project_id == "weaving"
        assert found[0].status.type == "client_finished" and found[0].status.reason.type == "success"
    finally:
        srv.stop()
