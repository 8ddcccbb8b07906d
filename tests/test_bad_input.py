"""Raw HTTP with bad input: every case is a 4xx with a JSON body naming the problem, and the
server keeps serving (and another tenant's state does not change)."""

import base64
import json
import os

import pytest
import requests
import zstandard

from conftest import ALICE, BOB, MODEL_NAME

H = {"X-API-Key": ALICE}


def post(server, path, body=None, data=None, headers=H):
    if data is not None:
        return requests.post(server.url + path, data=data, headers={**headers, "Content-Type": "application/json"})
    return requests.post(server.url + path, json=body, headers=headers)


@pytest.fixture(scope="module")
def run(keyed_server):
    s = post(keyed_server, "/api/v1/create_session", {}).json()["session_id"]
    p = post(keyed_server, "/api/v1/create_model",
             {"session_id": s, "base_model": MODEL_NAME, "lora_config": {"rank": 4}}).json()
    r = post(keyed_server, "/api/v1/retrieve_future", {"request_id": p["request_id"]})
    assert r.json()["model_id"] == p["model_id"], r.text
    return {"session": s, "model_id": p["model_id"]}


def fb_body(model_id, tokens, targets, weights):
    return {
        "model_id": model_id,
        "forward_backward_input": {
            "loss_fn": "cross_entropy",
            "data": [{
                "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
                "loss_fn_inputs": {
                    "target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]},
                    "weights": {"data": weights, "dtype": "float32", "shape": [len(weights)]},
                },
            }],
        },
    }


def fb_with(model_id, loss_fn="cross_entropy", **datum_fields):
    """A one-datum forward_backward body with `loss_fn` and extra fields on the datum."""
    body = fb_body(model_id, [1, 2, 3], [2, 3, 4], [1.0] * 3)
    body["forward_backward_input"]["loss_fn"] = loss_fn
    body["forward_backward_input"]["data"][0].update(datum_fields)
    return body


def fb_2d(model_id, targets, weights, loss_fn="cross_entropy", datums=1, tokens=(1, 2, 3)):
    """A forward_backward body of `datums` datums with 2-D loss inputs (`TensorData` dicts)."""
    inputs = {"target_tokens": targets, **({"weights": weights} if weights else {})}
    if loss_fn != "cross_entropy":
        n = len(tokens)
        inputs.update(logprobs={"data": [0.0] * n, "dtype": "float32", "shape": [n]},
                      advantages={"data": [1.0] * n, "dtype": "float32", "shape": [n]})
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": list(tokens)}]}, "loss_fn_inputs": inputs}
    return {"model_id": model_id, "forward_backward_input": {"loss_fn": loss_fn, "data": [datum] * datums}}


TOP2 = {"data": [5, 9, 7, 3, 1, 2], "dtype": "int64", "shape": [3, 2]}
TOP2_WEIGHTS = {"data": [0.5] * 6, "dtype": "float32", "shape": [3, 2]}


def sample_with_targets(server, target_prompt_logprobs):
    """An asample request for a two-token prompt with `target_prompt_logprobs`."""
    return post(server, "/api/v1/asample", {
        "base_model": MODEL_NAME, "num_samples": 1, "target_prompt_logprobs": target_prompt_logprobs,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 4}})


def expect(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert "error" in body and "error_type" in body, body
    for n in needles:
        assert n in r.text, (n, r.text)
    return body


def encoded(server, path, body, encoding, headers=H):
    """POSTs `body` (bytes) as JSON with `Content-Encoding: encoding`."""
    return requests.post(server.url + path, data=body, headers={
        **headers, "Content-Type": "application/json", "Content-Encoding": encoding})


# 5 MB of spaces compress to a few hundred bytes; decoded they pass the 4 MiB body limit.
ZSTD_BOMB = zstandard.ZstdCompressor().compress(b'{"model_id": "x"' + b" " * 5_000_000 + b"}")


CASES = {
    "gzip_body": lambda s, run: (encoded(s, "/api/v1/optim_step", b"\x1f\x8b", "gzip"), 415, ["gzip", "zstd"]),
    "corrupt_zstd": lambda s, run: (encoded(s, "/api/v1/optim_step", b"not zstd", "zstd"), 400, ["not valid zstd"]),
    "zstd_bomb": lambda s, run: (encoded(s, "/api/v1/optim_step", ZSTD_BOMB, "zstd"), 413, ["larger than the limit"]),
    # A stranger's body is never decoded (nor its encoding judged): the handler answers 401.
    "zstd_bomb_no_key": lambda s, run: (encoded(s, "/api/v1/optim_step", ZSTD_BOMB, "zstd", headers={}),
                                        401, ["X-API-Key"]),
    "gzip_body_no_key": lambda s, run: (encoded(s, "/api/v1/optim_step", b"\x1f\x8b", "gzip", headers={}),
                                        401, ["X-API-Key"]),
    "wrong_method": lambda s, run: (
        requests.get(s.url + "/api/v1/optim_step", headers=H), 405, ["GET /api/v1/optim_step"]),
    "malformed_json": lambda s, run: (post(s, "/api/v1/optim_step", data=b'{"model_id": '), 400, ["malformed JSON"]),
    "wrong_type": lambda s, run: (
        post(s, "/api/v1/optim_step", {"model_id": run["model_id"], "adam_params": {"learning_rate": "fast"}}),
        400, ["adam_params.learning_rate"]),
    "missing_field": lambda s, run: (
        post(s, "/api/v1/create_model", {"session_id": run["session"]}), 400, ["base_model"]),
    "unknown_model": lambda s, run: (
        post(s, "/api/v1/optim_step", {"model_id": "nope", "adam_params": {}}), 404, ["nope"]),
    "unknown_route": lambda s, run: (post(s, "/api/v1/no_such_route", {}), 404, ["POST /api/v1/no_such_route"]),
    "unknown_future": lambda s, run: (post(s, "/api/v1/retrieve_future", {"request_id": "nope"}), 404, ["nope"]),
    "unknown_session": lambda s, run: (
        post(s, "/api/v1/create_model", {"session_id": "nope", "base_model": MODEL_NAME}), 404, ["session"]),
    "unknown_base_model": lambda s, run: (
        post(s, "/api/v1/create_model", {"session_id": run["session"], "base_model": "gpt-9"}), 400, ["base_model"]),
    "rank_zero": lambda s, run: (
        post(s, "/api/v1/create_model",
             {"session_id": run["session"], "base_model": MODEL_NAME, "lora_config": {"rank": 0}}), 400, ["rank"]),
    "out_of_vocab": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_body(run["model_id"], [1, 2, 10**7], [2, 3, 4], [1, 1, 1])),
        400, ["model_input", "10000000"]),
    "mismatched_lengths": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_body(run["model_id"], [1, 2, 3], [2, 3], [1, 1])),
        400, ["target_tokens"]),
    "nan_learning_rate": lambda s, run: (
        post(s, "/api/v1/optim_step", data=b'{"model_id": "%s", "adam_params": {"learning_rate": NaN}}'
             % run["model_id"].encode()), 400, ["malformed JSON"]),
    "negative_learning_rate": lambda s, run: (
        post(s, "/api/v1/optim_step", {"model_id": run["model_id"], "adam_params": {"learning_rate": -1}}),
        400, ["adam_params.learning_rate"]),
    "absurd_learning_rate": lambda s, run: (
        post(s, "/api/v1/optim_step", {"model_id": run["model_id"], "adam_params": {"learning_rate": 1e30}}),
        400, ["adam_params.learning_rate", "10"]),
    "weight_decay_beyond_one_over_lr": lambda s, run: (
        post(s, "/api/v1/optim_step", {"model_id": run["model_id"],
                                       "adam_params": {"learning_rate": 1.0, "weight_decay": 5.0}}),
        400, ["adam_params.weight_decay", "learning_rate"]),
    "huge_max_tokens": lambda s, run: (
        post(s, "/api/v1/asample", {"base_model": MODEL_NAME, "num_samples": 1,
                                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                    "sampling_params": {"max_tokens": 10**9}}),
        400, ["sampling_params.max_tokens"]),
    "unknown_loss": lambda s, run: (
        post(s, "/api/v1/forward_backward",
             {**fb_body(run["model_id"], [1], [2], [1]),
              "forward_backward_input": {**fb_body(run["model_id"], [1], [2], [1])["forward_backward_input"],
                                         "loss_fn": "hinge"}}),
        400, ["loss_fn", "hinge"]),
    "bad_checkpoint_path": lambda s, run: (
        post(s, "/api/v1/load_weights", {"model_id": run["model_id"], "path": "/etc/passwd"}), 400, ["path"]),
    "bad_checkpoint_name": lambda s, run: (
        post(s, "/api/v1/save_weights", {"model_id": run["model_id"], "path": "../escape"}), 400, ["path"]),
    "oversized_body": lambda s, run: (
        post(s, "/api/v1/optim_step", data=b"[" + b"1," * (3 * 1024 * 1024) + b"1]"), 413, ["limit"]),
    "too_many_stop_strings": lambda s, run: (
        post(s, "/api/v1/asample", {"base_model": MODEL_NAME, "num_samples": 1,
                                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                    "sampling_params": {"max_tokens": 4, "stop": [f"s{i}" for i in range(65)]}}),
        400, ["sampling_params.stop", "64"]),
    "stable_reinforce_without_provenance": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_with(run["model_id"], "stable_reinforce")),
        400, ["data[0].loss_fn_input_spans", "record_stability_info"]),
    "custom_loss_id_not_a_string": lambda s, run: (
        post(s, "/api/v1/forward_backward", dict(fb_body(run["model_id"], [1, 2], [2, 3], [1.0, 1.0]),
                                                 forward_backward_input={"loss_fn": "custom", "data": [],
                                                                         "loss_fn_config": {"loss_id": 1}})),
        400, ["loss_fn_config.loss_id", "create_custom_loss"]),
    "custom_loss_unknown": lambda s, run: (
        post(s, "/api/v1/forward_backward", dict(fb_body(run["model_id"], [1, 2], [2, 3], [1.0, 1.0]),
                                                 forward_backward_input={"loss_fn": "custom", "data": [],
                                                                         "loss_fn_config": {"loss_id": "s:loss:7"}})),
        404, ["custom loss", "s:loss:7"]),
    "custom_loss_bad_graph": lambda s, run: (
        post(s, "/api/v1/create_custom_loss", {"session_id": run["session"], "custom_loss_seq_id": 0,
                                               "name": "l", "inputs": [{"name": "logprobs", "rank": 1}],
                                               "graph": {"format": 2, "nodes": []}}),
        400, ["graph.format"]),
    "sample_top_k_too_wide": lambda s, run: (
        post(s, "/api/v1/asample", {"base_model": MODEL_NAME, "num_samples": 1, "topk_sample_logprobs": 500,
                                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                    "sampling_params": {"max_tokens": 4}}),
        400, ["topk_sample_logprobs", "128"]),
    "sample_target_ids_absurd_sparse_shape": lambda s, run: (
        sample_with_targets(s, {"data": [], "dtype": "int64", "shape": [1, 4_000_000_000],
                                "sparse_crow_indices": [0, 0], "sparse_col_indices": []}),
        400, ["target_prompt_logprobs", "shape"]),
    "sample_target_ids_unsorted_sparse_columns": lambda s, run: (
        sample_with_targets(s, {"data": [5, 6], "dtype": "int64", "shape": [1, 4],
                                "sparse_crow_indices": [0, 2], "sparse_col_indices": [3, 1]}),
        400, ["target_prompt_logprobs", "sparse CSR"]),
    "sample_target_ids_sparse_offsets_short_of_the_values": lambda s, run: (
        sample_with_targets(s, {"data": [5, 6], "dtype": "int64", "shape": [1, 4],
                                "sparse_crow_indices": [0, 1], "sparse_col_indices": [0, 1]}),
        400, ["target_prompt_logprobs", "sparse CSR"]),
    "forward_backward_span_lengths_overflow": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_with(
            run["model_id"],
            model_input_spans=[{"prompt_tokens": {"sequence_id": "x:0", "length": 3}}],
            loss_fn_input_spans=[{"sampled_tokens": {"sequence_id": "x:0", "length": 2**63 - 1}}] * 3)),
        400, ["data[0].loss_fn_input_spans", "tile"]),
    "sample_target_ids_out_of_vocab": lambda s, run: (
        sample_with_targets(s, {"data": [10**9], "dtype": "int64", "shape": [1, 1]}),
        400, ["target_prompt_logprobs", "vocabulary"]),
    "bad_query_string": lambda s, run: (
        requests.get(s.url + "/api/v1/training_runs?limit=many", headers=H), 400, ["query"]),
    "request_over_the_token_limit": lambda s, run: (
        post(s, "/api/v1/forward_backward",
             {**fb_body(run["model_id"], [1], [2], [1]),
              "forward_backward_input": {"loss_fn": "cross_entropy", "data": [
                  fb_body(run["model_id"], [1] * n, [2] * n, [1] * n)["forward_backward_input"]["data"][0]
                  for n in [2048] * 16 + [1]]}}),
        400, ["data", "32769 tokens", "--max-request-tokens"]),
    "top_k_targets_with_a_policy_loss": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_2d(run["model_id"], TOP2, TOP2_WEIGHTS, "importance_sampling")),
        400, ["data[0].loss_fn_inputs.target_tokens", "cross_entropy"]),
    "top_k_weights_beside_one_target_per_position": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_2d(
            run["model_id"], {"data": [5, 9, 7], "dtype": "int64", "shape": [3]}, TOP2_WEIGHTS)),
        400, ["data[0].loss_fn_inputs.weights", "shape of target_tokens"]),
    "top_k_rows_not_one_per_position": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_2d(
            run["model_id"], {"data": [5, 9, 7, 3], "dtype": "int64", "shape": [2, 2]}, None)),
        400, ["data[0].loss_fn_inputs.target_tokens", "one row per model_input position (3)"]),
    "top_k_absurd_sparse_width": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_2d(
            run["model_id"], {"data": [], "dtype": "int64", "shape": [3, 4_000_000_000],
                              "sparse_crow_indices": [0, 0, 0, 0], "sparse_col_indices": []}, None)),
        400, ["data[0].loss_fn_inputs.target_tokens", "1024"]),
    "top_k_sparse_columns_outside_the_matrix": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_2d(
            run["model_id"], {"data": [5], "dtype": "int64", "shape": [3, 2],
                              "sparse_crow_indices": [0, 1, 1, 1], "sparse_col_indices": [2]}, None)),
        400, ["data[0].loss_fn_inputs.target_tokens", "sparse CSR"]),
    "top_k_sparse_inputs_too_large_once_dense": lambda s, run: (
        post(s, "/api/v1/forward_backward", fb_2d(
            run["model_id"], {"data": [], "dtype": "int64", "shape": [2048, 1024],
                              "sparse_crow_indices": [0] * 2049, "sparse_col_indices": []},
            None, datums=3, tokens=[1] * 2048)),
        400, ["data[2].loss_fn_inputs.target_tokens", "4194304 values"]),
    "top_k_advantages": lambda s, run: (
        post(s, "/api/v1/forward_backward", {"model_id": run["model_id"], "forward_backward_input": {
            "loss_fn": "cross_entropy", "data": [{
                "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                "loss_fn_inputs": {"target_tokens": TOP2, "advantages": TOP2_WEIGHTS}}]}}),
        400, ["data[0].loss_fn_inputs.advantages", "1-D"]),
    "no_key": lambda s, run: (post(s, "/api/v1/create_session", {}, headers={}), 401, ["X-API-Key"]),
    "wrong_key": lambda s, run: (post(s, "/api/v1/create_session", {}, headers={"X-API-Key": "tml-guess-1234"}),
                                 401, ["unknown API key"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_named_4xx_and_the_server_keeps_serving(keyed_server, run, case):
    r, status, needles = CASES[case](keyed_server, run)
    expect(r, status, *needles)
    assert requests.get(keyed_server.url + "/api/v1/healthz", timeout=5).ok


def test_bad_input_leaves_other_tenants_untouched(keyed_server, run):
    hb = {"X-API-Key": BOB}
    s = post(keyed_server, "/api/v1/create_session", {}, headers=hb).json()["session_id"]
    p = post(keyed_server, "/api/v1/create_model", {"session_id": s, "base_model": MODEL_NAME,
                                                    "lora_config": {"rank": 4, "seed": 1}}, headers=hb).json()
    post(keyed_server, "/api/v1/retrieve_future", {"request_id": p["request_id"]}, headers=hb)
    body = fb_body(p["model_id"], [1, 2, 3, 4], [2, 3, 4, 5], [1, 1, 1, 1])
    body["forward_only"] = True

    def loss():
        f = post(keyed_server, "/api/v1/forward_backward", body, headers=hb).json()
        r = post(keyed_server, "/api/v1/retrieve_future", {"request_id": f["request_id"]}, headers=hb).json()
        return r["metrics"]["loss:sum"]

    before = loss()
    for case in CASES.values():
        case(keyed_server, run)
    assert loss() == before


def test_sync_sample_route_and_stats(keyed_server, tokenizer):
    body = {"base_model": MODEL_NAME, "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokenizer("The capital of France is").input_ids}]},
            "sampling_params": {"max_tokens": 6, "temperature": 0.0}}
    r = post(keyed_server, "/api/v1/sample", body)
    assert r.status_code == 200, r.text
    seqs = r.json()["sequences"]
    assert len(seqs) == 2 and seqs[0]["tokens"] == seqs[1]["tokens"]
    assert "Paris" in tokenizer.decode(seqs[0]["tokens"])
    stats = requests.get(keyed_server.url + "/api/model-stats", headers=H).json()
    assert stats["base_model"] == MODEL_NAME and stats["done"] > 0
    assert requests.get(keyed_server.url + "/metrics").status_code == 401, "/metrics needs a key"
    metrics = requests.get(keyed_server.url + "/metrics", headers=H).text
    assert "loraloom_jobs_total{outcome=\"done\"}" in metrics
    assert 'tenant="bob"' not in metrics, "a tenant sees no other tenant's series"
    assert "loraloom_batches_total" in metrics
    assert 'loraloom_job_duration_seconds_bucket{le="+Inf"}' in metrics
    assert "# TYPE loraloom_tenant_jobs_queued gauge" in metrics
    assert "tml-" not in metrics, "keys never appear in metrics"


def test_lenient_inputs_the_sdk_allows_are_accepted(keyed_server, run):
    # cross_entropy without weights (the SDK's own forward() example) weighs every token 1.
    body = fb_body(run["model_id"], [1, 2, 3], [2, 3, 4], [1, 1, 1])
    body["forward_only"] = True
    weighted = post(keyed_server, "/api/v1/forward_backward", body).json()
    del body["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]
    unweighted = post(keyed_server, "/api/v1/forward_backward", body).json()
    res = [post(keyed_server, "/api/v1/retrieve_future", {"request_id": f["request_id"]}).json()
           for f in (weighted, unweighted)]
    assert res[0]["metrics"]["loss:sum"] == res[1]["metrics"]["loss:sum"], res
    # Python seeds may be negative.
    p = post(keyed_server, "/api/v1/create_model", {"session_id": run["session"], "base_model": MODEL_NAME,
                                                    "lora_config": {"rank": 4, "seed": -3}})
    assert p.status_code == 200, p.text


def test_a_zstd_body_is_decoded_before_the_handler_reads_it(keyed_server, run):
    """The client config asks the SDK to zstd-compress forward_backward bodies; any route takes a
    zstd body, and it answers exactly as the plain one."""
    config = requests.post(keyed_server.url + "/api/v1/client/config", json={}).json()
    assert config["proto_compress_fwdbwd"] is True
    body = fb_body(run["model_id"], [1, 2, 3, 4], [2, 3, 4, 5], [1, 1, 0.5, 1])
    body["forward_backward_input"]["loss_fn"] = "cross_entropy"

    def logprobs(response):
        assert response.status_code == 200, response.text
        done = post(keyed_server, "/api/v1/retrieve_future", {"request_id": response.json()["request_id"]}).json()
        return done["loss_fn_outputs"][0]["logprobs"]["data"]

    plain = logprobs(post(keyed_server, "/api/v1/forward", body))
    packed = zstandard.ZstdCompressor().compress(json.dumps(body).encode())
    assert logprobs(encoded(keyed_server, "/api/v1/forward", packed, "zstd")) == plain

    # A compressed body past axum's own 2 MiB default, within --max-body-bytes (4 MiB here):
    # read under the server's limit, decoded, answered by its handler (an unknown run: 404).
    noise = base64.b64encode(os.urandom(2_400_000)).decode()
    packed = zstandard.ZstdCompressor().compress(json.dumps({"model_id": "nope", "adam_params": {"learning_rate": 1e-3}, "pad": noise}).encode())
    assert 2 * 1024 * 1024 < len(packed) < 4 * 1024 * 1024
    expect(encoded(keyed_server, "/api/v1/optim_step", packed, "zstd"), 404, "nope")
