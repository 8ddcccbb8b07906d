"""Checkpoint lifecycle through the official SDK: ttl_seconds is validated, reported as
expires_at, applied by the reaper (files freed), and settable later; overwrite=False refuses to
replace; user_metadata comes back. The server runs with --min-checkpoint-ttl-secs 1 so that
expiry can be observed within the test (the default minimum is the SDK's documented hour)."""

import time

import pytest
import tinker

from conftest import MODEL_NAME, Server

KEY = "tml-lifecycle"


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("lifecycle"), "--min-checkpoint-ttl-secs", "1")
    yield srv
    srv.stop()


def listed(rest):
    return {c.tinker_path: c for c in rest.list_user_checkpoints().result().checkpoints}


def test_ttl_overwrite_and_metadata(lifecycle_server):
    sc = tinker.ServiceClient(base_url=lifecycle_server.url, api_key=KEY)
    rest = tinker.RestClient(base_url=lifecycle_server.url, api_key=KEY)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()

    keep = tc.save_state("keep", user_metadata={"step": "7"}).result().path
    short = tc.save_state("short", ttl_seconds=2).result().path
    later = tc.save_weights_for_sampler("later").result().path
    checkpoints = listed(rest)
    assert checkpoints[keep].user_metadata == {"step": "7"}
    assert checkpoints[keep].expires_at is None
    assert checkpoints[short].expires_at is not None
    [short_dir] = list(lifecycle_server.data_dir.glob("checkpoints/*/*/weights/short"))

    # overwrite=False (the SDK's default) refuses; overwrite=True replaces.
    with pytest.raises(tinker.BadRequestError) as refused:
        tc.save_state("keep").result()
    assert "overwrite" in str(refused.value)
    tc.save_state("keep", overwrite=True, user_metadata={"step": "8"}).result()
    assert listed(rest)[keep].user_metadata == {"step": "8"}

    # A TTL outside [minimum, ten years] names the field.
    with pytest.raises(tinker.BadRequestError) as bad_ttl:
        tc.save_state("forever", ttl_seconds=10**12).result()
    assert "ttl_seconds" in str(bad_ttl.value)

    # A TTL set later applies from then; null clears it.
    rest.set_checkpoint_ttl_from_tinker_path(later, 3600).result()
    assert listed(rest)[later].expires_at is not None
    rest.set_checkpoint_ttl_from_tinker_path(later, None).result()
    assert listed(rest)[later].expires_at is None

    # The reaper deletes the 2 s checkpoint and its files (it sweeps every ~10 s).
    deadline = time.time() + 60
    while short in listed(rest) and time.time() < deadline:
        time.sleep(0.5)
    assert short not in listed(rest), "the expired checkpoint is still listed"
    assert not short_dir.exists(), "its files were freed"
    assert keep in listed(rest) and later in listed(rest)
