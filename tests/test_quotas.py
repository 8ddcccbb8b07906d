"""Per-tenant quotas: listed checkpoints by count (--max-checkpoints-per-tenant), sampling
sessions (--max-samplers-per-tenant, whose removal of idle sessions the engine's unit tests
cover); checkpoints saved for one sampling session are not listed; /api/model-stats shows each
tenant its usage against the limits."""

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
