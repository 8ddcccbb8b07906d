"""The official `tinker` SDK against loraloom over real HTTP on 127.0.0.1, as a user's script."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import pytest
import requests
import tinker
from tinker import types

from conftest import ALICE, BOB, MODEL_NAME, Server

PAIRS = [
    ("Q: What colour is the loom? A:", " The loom is violet."),
    ("Q: Who weaves the adapters? A:", " Loraloom weaves them."),
    ("Q: Where does the thread go? A:", " Into the warp."),
    ("Q: How many shuttles? A:", " Exactly seven."),
]


def make_datum(tokenizer, prompt, answer):
    p = tokenizer(prompt).input_ids
    a = tokenizer(answer).input_ids + [tokenizer.eos_token_id]
    tokens = p + a
    weights = [0.0] * (len(p) - 1) + [1.0] * len(a)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def train_on_pairs(tc, tokenizer, steps, learning_rate):
    """`steps` rounds of cross-entropy forward_backward on PAIRS, each followed by an AdamW step."""
    data = [make_datum(tokenizer, p, a) for p, a in PAIRS]
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=learning_rate)).result()


def client(server, key=ALICE):
    return tinker.ServiceClient(base_url=server.url, api_key=key)


def test_a_user_script_fine_tunes_and_samples_the_trained_answer(keyed_server, tokenizer):
    sc = client(keyed_server)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=16, seed=0).result()
    data = [make_datum(tokenizer, p, a) for p, a in PAIRS]
    losses = []
    # 1e-3: loss falls smoothly (119 -> 0.02 here). At 5e-3 with the SDK's default eps (1e-12)
    # the loss oscillates chaotically in peft and loraloom alike, so the outcome would depend
    # on rounding (see test_sdk_matches_peft.py for the step-by-step comparison).
    for i in range(20):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-3))
        losses.append(fb.result().metrics["loss:sum"])
        metrics = opt.result().metrics
        # No `step` key: tinker-cookbook merges these into rows keyed by its own integer step.
        assert "step" not in metrics and metrics["optimizer_step"] == i + 1, metrics
    assert losses[-1] < losses[0] / 2, losses
    sampler = tc.save_weights_and_get_sampling_client().result()
    for prompt, answer in PAIRS:
        res = sampler.sample(
            types.ModelInput.from_ints(tokenizer(prompt).input_ids),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=12, temperature=0.0),
        ).result()
        text = tokenizer.decode(res.sequences[0].tokens, skip_special_tokens=True)
        assert text.strip().startswith(answer.strip()), (prompt, text, losses)
    assert res.sequences[0].logprobs is not None and len(res.sequences[0].logprobs) == len(res.sequences[0].tokens)
    # compute_logprobs: one per prompt token, the first is None.
    lps = sampler.compute_logprobs(types.ModelInput.from_ints(tokenizer(prompt).input_ids)).result()
    assert lps[0] is None and all(isinstance(x, float) and x <= 0 for x in lps[1:])


def test_forward_returns_logprobs_without_training(keyed_server, tokenizer):
    sc = client(keyed_server)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
    data = [make_datum(tokenizer, *PAIRS[1])]
    a = tc.forward(data, "cross_entropy").result()
    b = tc.forward(data, "cross_entropy").result()
    assert a.metrics["loss:sum"] == b.metrics["loss:sum"]
    out = a.loss_fn_outputs[0]
    n = len(data[0].model_input.to_ints())
    assert len(out["logprobs"].tolist()) == n
    # forward_backward then optim_step changes the loss; forward alone did not.
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    c = tc.forward(data, "cross_entropy").result()
    assert c.metrics["loss:sum"] < a.metrics["loss:sum"]


def test_save_state_then_load_into_a_new_client_continues_identically(keyed_server, tokenizer):
    sc = client(keyed_server)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=3).result()
    data = [make_datum(tokenizer, p, a) for p, a in PAIRS[:2]]
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_state("after-2").result().path
    assert path.endswith("/weights/after-2")
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    for _ in range(2):
        la = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        lb = resumed.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        assert la == pytest.approx(lb, rel=1e-6, abs=1e-6)
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    # load_state into an existing client as well.
    other = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8).result()
    other.load_state_with_optimizer(path).result()
    rest = tinker.RestClient(base_url=keyed_server.url, api_key=ALICE)
    ckpts = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert any(c.tinker_path == path for c in ckpts)


def test_two_tenants_train_concurrently_and_cannot_see_each_other(keyed_server, tokenizer):
    def train(key):
        sc = client(keyed_server, key)
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
        data = [make_datum(tokenizer, *PAIRS[2])]
        fut = None
        for _ in range(3):
            fut = tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        path = tc.save_state("mine").result().path
        return tc.model_id, path, fut.request_id if hasattr(fut, "request_id") else None

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        (a_model, a_path, _), (b_model, b_path, _) = pool.map(train, [ALICE, BOB])

    alice = tinker.RestClient(base_url=keyed_server.url, api_key=ALICE)
    runs = [r.training_run_id for r in alice.list_training_runs(limit=100).result().training_runs]
    assert a_model in runs and b_model not in runs
    h = {"X-API-Key": BOB}
    # Alice's ids answer 404 to Bob, as if absent.
    r = requests.post(keyed_server.url + "/api/v1/get_info", json={"model_id": a_model}, headers=h)
    assert r.status_code == 404
    r = requests.get(keyed_server.url + f"/api/v1/training_runs/{a_model}", headers=h)
    assert r.status_code == 404
    r = requests.post(keyed_server.url + "/api/v1/weights_info", json={"tinker_path": a_path}, headers=h)
    assert r.status_code == 404
    r = requests.post(keyed_server.url + "/api/v1/optim_step",
                      json={"model_id": a_model, "adam_params": {"learning_rate": 1e-3}}, headers=h)
    assert r.status_code == 404
    # Bob cannot sample from Alice's checkpoint either.
    s = requests.post(keyed_server.url + "/api/v1/create_session", json={}, headers=h).json()["session_id"]
    r = requests.post(keyed_server.url + "/api/v1/create_sampling_session",
                      json={"session_id": s, "model_path": a_path}, headers=h)
    assert r.status_code == 404
    # Nor see Alice's futures.
    sa = requests.post(keyed_server.url + "/api/v1/create_session", json={}, headers={"X-API-Key": ALICE}).json()
    p = requests.post(keyed_server.url + "/api/v1/optim_step",
                      json={"model_id": a_model, "adam_params": {"learning_rate": 1e-3}},
                      headers={"X-API-Key": ALICE}).json()
    r = requests.post(keyed_server.url + "/api/v1/retrieve_future", json={"request_id": p["request_id"]}, headers=h)
    assert r.status_code == 404
    assert sa["session_id"]
    # Bob cannot delete Alice's checkpoint; Alice can, with the SDK's RestClient.
    bob = tinker.RestClient(base_url=keyed_server.url, api_key=BOB)
    with pytest.raises(tinker.NotFoundError):
        bob.delete_checkpoint_from_tinker_path(a_path).result()
    assert any(c.tinker_path == a_path for c in alice.list_checkpoints(a_model).result().checkpoints)
    alice.delete_checkpoint_from_tinker_path(a_path).result()
    assert all(c.tinker_path != a_path for c in alice.list_checkpoints(a_model).result().checkpoints)
    r = requests.post(keyed_server.url + "/api/v1/weights_info", json={"tinker_path": a_path},
                      headers={"X-API-Key": ALICE})
    assert r.status_code == 404


def metric(server, name):
    text = requests.get(server.url + "/metrics", headers={"X-API-Key": "tml-anyone"}).text
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " "))


def sampling_stats(server):
    return requests.get(server.url + "/api/model-stats", headers={"X-API-Key": "tml-anyone"}).json()["sampling"]


def test_requests_joining_a_decoding_sequence_of_their_prompt_share_its_prefill(server):
    """tinker-cookbook's RL loops send a group's samples as separate requests with one prompt.
    Requests that join while a sequence of their prompt decodes start from a copy of its prompt's
    keys and values: no prefill of their own (counted in loraloom_sample_prompts_shared_total),
    and a seeded one draws what it draws alone."""
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-anyone")
    sampler = sc.create_sampling_client(base_model=MODEL_NAME)
    prompt = types.ModelInput.from_ints([1, 504, 3437, 314, 260, 28, 9, 4021])
    seeded = types.SamplingParams(max_tokens=4, temperature=1.0, seed=7, stop=[])
    alone = sampler.sample(prompt, num_samples=1, sampling_params=seeded).result().sequences[0]
    prefills = metric(server, "loraloom_sample_prefills_total")
    shared = metric(server, "loraloom_sample_prompts_shared_total")
    steps = sampling_stats(server)["decode_steps"]
    holder = sampler.sample(prompt, num_samples=1,
                            sampling_params=types.SamplingParams(max_tokens=48, temperature=0.0, stop=[]))
    deadline = time.monotonic() + 60
    while sampling_stats(server)["decode_steps"] == steps:
        assert time.monotonic() < deadline, "the long request never started decoding"
        time.sleep(0.01)
    others = types.SamplingParams(max_tokens=3, temperature=0.7, stop=[])
    followers = [sampler.sample(prompt, num_samples=1, sampling_params=seeded)]
    followers += [sampler.sample(prompt, num_samples=2, sampling_params=others) for _ in range(3)]
    crowded = followers[0].result().sequences[0]
    assert crowded.tokens == alone.tokens
    assert crowded.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert all(len(s.tokens) == 3 for f in followers[1:] for s in f.result().sequences)
    assert len(holder.result().sequences[0].tokens) == 48
    assert metric(server, "loraloom_sample_prefills_total") - prefills == 1, "only the long request prefilled"
    assert metric(server, "loraloom_sample_prompts_shared_total") - shared == 4


def test_the_next_turn_of_a_conversation_reuses_the_keys_and_values_of_the_last(server):
    """Multi-turn environments send the whole conversation so far as each turn's prompt: the
    server keeps finished sequences' keys and values (its prefix cache), so turn two computes
    only what turn one did not (loraloom_sample_prompt_tokens_reused_total) and samples what
    a full prefill of its prompt samples (the same request asking for prompt logprobs, which
    computes every position)."""
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-anyone")
    sampler = sc.create_sampling_client(base_model=MODEL_NAME).result()
    turn_one = [1, 604, 3537, 314, 260, 28, 9, 4021, 17, 880, 29, 31, 7, 1201, 44, 3, 90, 12, 5]
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    said = sampler.sample(types.ModelInput.from_ints(turn_one), 1, greedy).result().sequences[0].tokens
    # Turn one is kept; the loop, now empty, reserves and holds nothing.
    stats = requests.get(server.url + "/api/model-stats", headers={"X-API-Key": "tml-anyone"}).json()["sampling"]
    assert stats["kept_tokens"] >= len(turn_one) + len(said) - 1
    assert stats["kv_tokens_reserved"] == stats["kv_tokens_held"] == 0
    assert stats["kv_budget_tokens"] >= 4096
    reused = metric(server, "loraloom_sample_prompt_tokens_reused_total")
    turn_two = types.ModelInput.from_ints(turn_one + said + [216, 1428, 30])
    cached = sampler.sample(turn_two, 1, greedy).result().sequences[0]
    assert metric(server, "loraloom_sample_prompt_tokens_reused_total") - reused == len(turn_one) + len(said) - 1
    full = sampler.sample(turn_two, 1, greedy, include_prompt_logprobs=True).result().sequences[0]
    assert cached.tokens == full.tokens
    assert cached.logprobs == pytest.approx(full.logprobs, abs=1e-4)


def test_one_tenants_prompts_are_never_reused_for_another(keyed_server):
    """Keys and values of one tenant's prompts (kept finished sequences, live ones) serve only
    that tenant's later prompts: another tenant's identical or extending prompt computes its
    own, so it cannot learn from timing or the counter what others sent."""
    def reused():
        text = requests.get(keyed_server.url + "/metrics", headers={"X-API-Key": ALICE}).text
        line = [l for l in text.splitlines() if l.startswith("loraloom_sample_prompt_tokens_reused_total ")]
        return float(line[0].rsplit(" ", 1)[1]) if line else 0.0

    prompt = [1, 604, 3537, 314, 260, 28, 9, 4021, 17, 880, 29, 31, 7, 1201, 44, 3, 91, 12, 5]
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    samplers = {key: client(keyed_server, key).create_sampling_client(base_model=MODEL_NAME).result()
                for key in (ALICE, BOB)}
    said = samplers[ALICE].sample(types.ModelInput.from_ints(prompt), 1, greedy).result().sequences[0].tokens
    follow_up = types.ModelInput.from_ints(prompt + said + [216, 1428])
    before = reused()
    theirs = samplers[BOB].sample(follow_up, 1, greedy).result().sequences[0]
    assert reused() == before, "another tenant's conversation was reused"
    mine = samplers[ALICE].sample(follow_up, 1, greedy).result().sequences[0]
    assert reused() - before == len(prompt) + len(said) - 1
    assert mine.tokens == theirs.tokens


def test_samples_of_one_prompt_share_one_prefill_and_concurrent_requests_all_finish(server):
    """num_samples completions share their prompt's prefill (counted); requests sent together,
    of different lengths, each finish with exactly what they asked for; a seeded request draws
    the same tokens alone and among them."""
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-anyone")
    sampler = sc.create_sampling_client(base_model=MODEL_NAME)
    prompt = types.ModelInput.from_ints([5, 77, 3437, 314, 260])
    seeded = types.SamplingParams(max_tokens=6, temperature=1.0, seed=42, stop=[])
    before = metric(server, "loraloom_sample_prefills_total")
    res = sampler.sample(prompt, num_samples=4, sampling_params=seeded).result()
    assert metric(server, "loraloom_sample_prefills_total") - before == 1
    assert len(res.sequences) == 4 and all(len(s.tokens) == 6 for s in res.sequences)
    alone = res.sequences[0].tokens
    futures = [
        sampler.sample(prompt, num_samples=1,
                       sampling_params=types.SamplingParams(max_tokens=2 + 3 * i, temperature=0.8, stop=[]))
        for i in range(5)
    ]
    crowded = sampler.sample(prompt, num_samples=1, sampling_params=seeded)
    for i, f in enumerate(futures):
        assert len(f.result().sequences[0].tokens) == 2 + 3 * i
    assert crowded.result().sequences[0].tokens == alone
    stats = requests.get(server.url + "/api/model-stats", headers={"X-API-Key": "tml-anyone"}).json()["sampling"]
    # Seven requests: each prefilled, or sharing another's prefill of the same prompt.
    assert stats["prefills"] + stats["prompts_shared"] >= 7
    assert stats["decode_tokens"] >= stats["decode_steps"] > 0
    assert stats["mean_time_to_first_token_s"] > 0


def test_get_tokenizer_loads_offline_and_other_optimizers_are_refused_by_name(keyed_server, tokenizer):
    """`get_tokenizer()` needs no network on the server's machine (the tests run with
    HF_HUB_OFFLINE=1): `tokenizer_id` is the model's directory. An optimizer other than AdamW is
    a 400 naming it, never an AdamW run in its place, whether a run is created fresh or from a
    checkpoint."""
    sc = client(keyed_server)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
    theirs = tc.get_tokenizer()
    text = "Loraloom weaves adapters, 42 of them."
    assert theirs(text).input_ids == tokenizer(text).input_ids
    with pytest.raises(tinker.BadRequestError, match="optimizer_config.type.*dimuon"):
        sc.create_lora_training_client(
            base_model=MODEL_NAME, rank=4, optimizer=types.DimuonOptimizerConfig()
        ).result()
    with pytest.raises(tinker.BadRequestError, match="optimizer_params.type.*dimuon"):
        tc.optim_step(types.DimuonParams(learning_rate=1e-3)).result()
    # A run created from a checkpoint's weights takes AdamW (the default) or refuses, and its
    # base model override must name this server's model.
    path = tc.save_state("optimizer-refusals").result().path
    loaded = sc.create_training_client_from_state(path, optimizer=types.AdamOptimizerConfig()).result()
    assert loaded.get_info().model_id == loaded.model_id
    with pytest.raises(tinker.BadRequestError, match="optimizer_config.type.*dimuon"):
        sc.create_training_client_from_state(path, optimizer=types.DimuonOptimizerConfig()).result()
    with pytest.raises(tinker.BadRequestError, match="base_model.*not served"):
        sc.create_training_client_from_state(path, base_model="Qwen/Qwen3-8B").result()


def test_a_batch_over_the_request_limit_is_sent_in_parts_by_the_sdk(tmp_path):
    """The client config tells the SDK --max-request-tokens (as fwdbwd_max_chunk_bytes_count),
    so a batch larger than it (an SFT batch of the cookbook's size) goes in several requests
    whose gradients accumulate, instead of a 400: its summed loss is that of its datums one by
    one, and it trains."""
    srv = Server(tmp_path, "--max-request-tokens", "512")
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=3).result()
        data = [types.Datum(model_input=types.ModelInput.from_ints([(7 * i + 13 * j) % 4000 + 20 for j in range(100)]),
                            loss_fn_inputs={"target_tokens": [(7 * i + 13 * j + 5) % 4000 + 20 for j in range(100)],
                                            "weights": [1.0] * 100})
                for i in range(8)]
        alone = sum(tc.forward([d], "cross_entropy").result().metrics["loss:sum"] for d in data)
        whole = tc.forward_backward(data, "cross_entropy").result()
        assert len(whole.loss_fn_outputs) == 8
        assert whole.metrics["loss:sum"] == pytest.approx(alone, rel=1e-5)
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        after = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
        assert after < alone, (alone, after)
        sc.close("success").result()
    finally:
        srv.stop()


def test_tinker_auth_login_checks_a_key_that_the_sdk_then_uses(keyed_server, tmp_path):
    """`tinker auth login` (the SDK's CLI) checks a pasted key with GET /api/v1/auth/apikey/me
    and stores it; the SDK then works with no key passed. A wrong key is refused before it is
    stored, and a client cannot revoke the operator's key (DELETE is a JSON 403)."""
    env = {**os.environ, "HOME": str(tmp_path), "TINKER_BASE_URL": keyed_server.url}
    env.pop("TINKER_API_KEY", None)
    tinker_cli = [sys.executable, "-m", "tinker.cli"]

    def cli(*args, stdin=""):
        return subprocess.run(tinker_cli + list(args), input=stdin, env=env, text=True,
                              capture_output=True, timeout=120)

    wrong = cli("auth", "login", stdin="tml-guess-1234\n")
    assert wrong.returncode != 0 and "unknown API key" in wrong.stdout + wrong.stderr, wrong
    assert not (tmp_path / ".tinker" / "credentials.json").exists()

    login = cli("auth", "login", stdin=ALICE + "\n")
    assert login.returncode == 0, login
    assert "Logged in as alice (loraloom)" in login.stdout, login.stdout
    stored = json.loads((tmp_path / ".tinker" / "credentials.json").read_text())
    assert ALICE in json.dumps(stored)
    me = requests.get(keyed_server.url + "/api/v1/auth/apikey/me", headers={"X-API-Key": ALICE}).json()
    assert str(me["key_id"]) in json.dumps(stored) and me["name"] == "alice", (me, stored)
    bob = requests.get(keyed_server.url + "/api/v1/auth/apikey/me", headers={"X-API-Key": BOB}).json()
    assert bob["name"] == "bob" and bob["key_id"] != me["key_id"]

    # The stored key is the SDK's credential: a training run is created with no key passed.
    script = ("import tinker; sc = tinker.ServiceClient(); "
              f"print(sc.create_lora_training_client(base_model={MODEL_NAME!r}, rank=4).result().model_id)")
    made = subprocess.run([sys.executable, "-c", script], env=env, text=True, capture_output=True, timeout=300)
    assert made.returncode == 0 and ":train:" in made.stdout, made
    status = cli("auth", "status")
    assert status.returncode == 0 and "Tinker accessible: yes" in status.stdout, status

    revoke = requests.delete(keyed_server.url + "/api/v1/auth/apikey/me", headers={"X-API-Key": ALICE})
    assert revoke.status_code == 403 and "--api-key" in revoke.json()["error"], revoke.text
    logout = cli("auth", "logout")
    assert logout.returncode == 0 and "still active" in logout.stdout, logout
    assert requests.get(keyed_server.url + "/api/v1/auth/apikey/me", headers={"X-API-Key": ALICE}).ok
