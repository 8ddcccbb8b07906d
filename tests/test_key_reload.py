"""API keys change while the server runs: the keys file is followed (a change applies once it has
stayed put for one read, about 2-4 s) and SIGHUP applies it at once. Tenants are added, keys
rotated and revoked without a restart; a broken or empty file changes nothing."""

import os
import signal
import time

import requests
import tinker
from tinker import types

from conftest import MODEL_NAME, Server

ALICE = "tml-alice-0123456789"
ALICE_ROTATED = "tml-alice-rotated-98765"
BOB = "tml-bob-0123456789"
CAROL = "tml-carol-0123456789"
SWAPPED = "tml-swapped-fields-secret"


def write_keys(path, text):
    """Replaces the file whole, as editors and secret mounts do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def me(srv, key):
    return requests.get(srv.url + "/api/v1/auth/apikey/me", headers={"X-API-Key": key}, timeout=10)


def until(condition, timeout):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_keys_are_added_rotated_and_revoked_without_a_restart(tmp_path):
    keys = tmp_path / "keys"
    write_keys(keys, f"alice={ALICE}\n")
    srv = Server(tmp_path, "--api-keys-file", str(keys), "--api-key", f"carol={CAROL}")
    try:
        assert me(srv, ALICE).json()["name"] == "alice"
        assert me(srv, BOB).status_code == 401
        alice = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        run = alice.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=1).result()
        datum = types.Datum(model_input=types.ModelInput.from_ints([1, 504, 3437, 314]),
                            loss_fn_inputs={"target_tokens": [504, 3437, 314, 260], "weights": [1.0] * 4})

        # A new tenant, by editing the file: no signal, no restart.
        write_keys(keys, f"alice={ALICE}\nbob={BOB}\n")
        until(lambda: me(srv, BOB).status_code == 200, timeout=30)
        assert me(srv, BOB).json()["name"] == "bob"
        bob = tinker.ServiceClient(base_url=srv.url, api_key=BOB)
        bobs = bob.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=2).result()
        bobs.forward_backward([datum], "cross_entropy").result()
        export = bobs.save_weights_external("bobs-export").result().path
        link = tinker.RestClient(base_url=srv.url, api_key=BOB).get_external_weights_urls(export).result()
        link = link.urls["adapter_config.json"]
        assert requests.get(link, timeout=30).status_code == 200
        run.forward_backward([datum], "cross_entropy").result()
        run.optim_step(types.AdamParams(learning_rate=1e-3)).result()

        # Alice's key rotated and Bob's revoked, applied at once by SIGHUP.
        write_keys(keys, f"alice={ALICE_ROTATED}\n")
        srv.proc.send_signal(signal.SIGHUP)
        until(lambda: me(srv, ALICE).status_code == 401, timeout=10)
        assert me(srv, BOB).status_code == 401
        assert requests.get(link, timeout=30).status_code == 403, "a revoked tenant's links die with its keys"
        assert requests.get(link, timeout=30).status_code == 403, "a revoked tenant's links die with its keys"
        listed = requests.get(srv.url + "/api/v1/training_runs", headers={"X-API-Key": ALICE_ROTATED},
                              timeout=10).json()
        assert run.model_id in [r["training_run_id"] for r in listed["training_runs"]]
        # The rotated key reaches alice's run (a forward pass over HTTP, as the SDK sends it).
        body = {"model_id": run.model_id, "forward_only": True,
                "forward_backward_input": {"loss_fn": "cross_entropy", "data": [{
                    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 504, 3437, 314]}]},
                    "loss_fn_inputs": {"target_tokens": {"data": [504, 3437, 314, 260], "dtype": "int64"},
                                       "weights": {"data": [1.0] * 4, "dtype": "float32"}}}]}}
        for key, status in ((ALICE, 401), (ALICE_ROTATED, 200)):
            r = requests.post(srv.url + "/api/v1/forward_backward", json=body,
                              headers={"X-API-Key": key}, timeout=10)
            assert r.status_code == status, r.text
        done = requests.post(srv.url + "/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]},
                             headers={"X-API-Key": ALICE_ROTATED}, timeout=60).json()
        assert "metrics" in done, done

        # A file that does not parse, or holds no key (the flag's key would be left alone in
        # force), changes nothing and says so in the log, never echoing a key.
        broken = (f"alice {ALICE_ROTATED}\nmallory=sk-not-a-key\n", "# everyone removed\n",
                  f"{SWAPPED} alice\n")
        for i, text in enumerate(broken):
            write_keys(keys, text)
            srv.proc.send_signal(signal.SIGHUP)
            until(lambda: srv.output().count("API keys not reloaded") >= i + 1, timeout=10)
            assert me(srv, ALICE_ROTATED).json()["name"] == "alice"
            assert me(srv, CAROL).json()["name"] == "carol"
        assert srv.output().count("API keys not reloaded") == len(broken)
        assert SWAPPED not in srv.output() and ALICE_ROTATED not in srv.output()
        assert srv.proc.poll() is None, "SIGHUP does not stop the server"
        for c in (alice, bob):
            c.close("success")

        # Every key change is in its tenant's audit log, by public id, never the key; a change
        # made while the server was down, at its next start.
        def key_events(key):
            log = tinker.AdminClient(base_url=srv.url, api_key=key).get_audit_log(
                event_type="organizations").result().entries
            return [(e.event, e.event_details["key_id"], e.event_details["applied_by"]) for e in log]

        def key_id(key):
            return me(srv, key).json()["key_id"]

        rotated_id = key_id(ALICE_ROTATED)
        assert key_events(CAROL) == [("organization_api_key_added", key_id(CAROL), "server start")]
        events = key_events(ALICE_ROTATED)
        assert ("organization_api_key_added", key_id(ALICE_ROTATED), "keys file reloaded") in events
        assert [e[0] for e in events].count("organization_api_key_revoked") == 1
        assert [e[0] for e in events].count("organization_api_key_added") == 2
        write_keys(keys, f"alice={ALICE}\n")
        srv.stop()
        srv = Server(tmp_path, "--api-keys-file", str(keys), "--api-key", f"carol={CAROL}")
        events = key_events(ALICE)
        assert ("organization_api_key_revoked", rotated_id, "server start") in events
        assert ("organization_api_key_added", key_id(ALICE), "server start") in events
        assert len(key_events(CAROL)) == 1, "Carol's key did not change"
        log = requests.get(srv.url + "/api/v1/audit", headers={"X-API-Key": ALICE}, timeout=10).text
        assert ALICE not in log and ALICE_ROTATED not in log
    finally:
        srv.stop()
