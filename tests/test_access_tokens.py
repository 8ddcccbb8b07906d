"""Access tokens: the official SDK exchanges its API key for an hour-long token
(`/api/v1/auth/token`, because the client config says `pjwt_auth_enabled`) and sends the token
instead of the key. A token is its key's tenant, cannot be altered, and stops working when its
key is revoked; the SDK then tries to exchange the revoked key and fails as for a bad key."""

import base64
import json
import signal

import pytest
import requests
import tinker
from tinker import types

from conftest import MODEL_NAME, Server
from test_key_reload import me, until, write_keys

ALICE = "tml-alice-tokens-0123"
ALICE_NEW = "tml-alice-tokens-new-89"
BOB = "tml-bob-tokens-4567"
DATUM = types.Datum(model_input=types.ModelInput.from_ints([1, 504, 3437, 314]),
                    loss_fn_inputs={"target_tokens": [504, 3437, 314, 260], "weights": [1.0] * 4})


def token(srv, credential):
    return requests.post(srv.url + "/api/v1/auth/token", json={}, headers={"X-API-Key": credential},
                         timeout=10)


def runs(srv, credential):
    return requests.get(srv.url + "/api/v1/training_runs", headers={"X-API-Key": credential}, timeout=10)


def claims(jwt):
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def assert_invalid_token(response):
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert response.json()["error_type"] == "invalid_token"


def test_sdk_clients_send_a_token_that_lives_while_its_key_does(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    write_keys(keys, f"alice={ALICE}\nbob={BOB}\n")
    args = ("--api-keys-file", str(keys))
    srv = Server(tmp_path, *args)
    try:
        alice = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        run = alice.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=1).result()
        run.forward_backward([DATUM], "cross_entropy").result()
        run.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        # The SDK sent the token it exchanged its key for, not the key.
        assert type(alice.holder._default_auth).__name__ == "JwtAuthProvider"
        sent = alice.holder._default_auth._token
        assert sent.startswith("eyJ") and claims(sent)["sub"] == "alice"

        jwt = token(srv, ALICE).json()["jwt"]
        said = claims(jwt)
        assert said["sub"] == "alice" and said["exp"] - said["iat"] == 3600
        assert said["kid"] == me(srv, ALICE).json()["key_id"]
        # What `tinker auth login` checks before storing a pasted credential takes a key only.
        assert me(srv, jwt).status_code == 401
        # `whoami` reads the token's claims.
        who = tinker.RestClient(base_url=srv.url, api_key=ALICE).whoami().result()
        assert (who.user_urn, who.org_urn, who.email) == ("alice", "tml:organization:alice", "alice")
        assert run.model_id in [r["training_run_id"] for r in runs(srv, jwt).json()["training_runs"]]
        bobs_token = token(srv, BOB).json()["jwt"]
        assert run.model_id not in [r["training_run_id"] for r in runs(srv, bobs_token).json()["training_runs"]]

        # Altered or forged: refused as an invalid token, whatever it claims.
        head, payload, signature = jwt.split(".")
        forged = base64.urlsafe_b64encode(json.dumps(dict(said, sub="bob")).encode()).decode().rstrip("=")
        flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
        unsigned = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=")
        for bad in (f"{head}.{forged}.{signature}", f"{head}.{payload}.{flipped}", f"{unsigned}.{payload}."):
            assert_invalid_token(runs(srv, bad))
        # With tokens the SDK may take its credential from a command, run for each exchange.
        monkeypatch.delenv("TINKER_API_KEY", raising=False)
        monkeypatch.setenv("TINKER_CREDENTIAL_CMD", f"echo {BOB}")
        bob = tinker.ServiceClient(base_url=srv.url)
        bobs_run = bob.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=2).result()
        assert bobs_run.model_id in [r["training_run_id"] for r in runs(srv, bobs_token).json()["training_runs"]]
        # Only a key is exchanged for a token, never a token.
        assert token(srv, jwt).status_code == 401
        assert token(srv, "tml-mallory-000").status_code == 401

        # Tokens outlive a restart (the signing key is in the data directory).
        srv.stop()
        srv = Server(tmp_path, *args, port=srv.port)
        assert runs(srv, jwt).status_code == 200

        # Alice's key rotated: the tokens issued for the old one stop with it, and her SDK client,
        # whose token the server now refuses, cannot exchange its revoked key for another.
        write_keys(keys, f"alice={ALICE_NEW}\nbob={BOB}\n")
        srv.proc.send_signal(signal.SIGHUP)
        until(lambda: me(srv, ALICE).status_code == 401, timeout=10)
        assert_invalid_token(runs(srv, jwt))
        with pytest.raises(tinker.AuthenticationError):
            run.forward_backward([DATUM], "cross_entropy").result(timeout=60)
        assert runs(srv, token(srv, ALICE_NEW).json()["jwt"]).status_code == 200
        assert runs(srv, bobs_token).status_code == 200, "Bob's key was not touched"
    finally:
        srv.stop()


def test_without_access_tokens_clients_send_their_key(tmp_path):
    srv = Server(tmp_path, "--api-key", f"alice={ALICE}", "--access-tokens", "false")
    try:
        config = requests.post(srv.url + "/api/v1/client/config", json={}, headers={"X-API-Key": ALICE},
                               timeout=10).json()
        assert config["pjwt_auth_enabled"] is False
        assert token(srv, ALICE).status_code == 403
        alice = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        run = alice.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=1).result()
        run.forward_backward([DATUM], "cross_entropy").result()
        assert type(alice.holder._default_auth).__name__ == "ApiKeyAuthProvider"
    finally:
        srv.stop()
