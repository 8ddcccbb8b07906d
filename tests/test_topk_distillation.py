"""Top-K distillation through the official SDK, as tinker-cookbook's distillation recipes do it
(`train_off_policy.py`, `sdft.py`): a teacher's `topk_prompt_logprobs` become `[N, K]`
`target_tokens` and `weights` (its renormalised probabilities) for `cross_entropy`, whose loss
is `-sum_{n,k} w[n,k] * log p(t[n,k])`. The SDK sends such a torch tensor as sparse CSR when
that is smaller (rows of zeros: the prompt), dense otherwise; both occur here.

Oracle: peft + torch.optim.Adam on the same weights (loraloom's initial adapter, saved with
save_state) computing the same loss step by step; tolerance 1e-3 relative per step, as in
test_sdk_matches_peft.py (f32 on both sides; summation order differs, and Adam compounds it).
"""

import requests
import tinker
import torch
from tinker import types

from conftest import MODEL_NAME
from test_sdk import PAIRS, make_datum
from test_sdk_matches_peft import peft_losses, sdk_losses

K, STEPS, LR, TOLERANCE = 8, 4, 1e-3, 1e-3


def teacher_datum(teacher, tokenizer, prompt, answer):
    """The cookbook's construction: the teacher's top-K at every answer position, renormalised
    over the K ids; prompt positions stay zero (so the SDK sends the tensors sparse)."""
    p = tokenizer(prompt).input_ids
    tokens = p + tokenizer(answer).input_ids + [tokenizer.eos_token_id]
    scored = teacher.sample(types.ModelInput.from_ints(tokens), num_samples=1,
                            sampling_params=types.SamplingParams(max_tokens=1),
                            include_prompt_logprobs=True, topk_prompt_logprobs=K).result()
    n = len(tokens) - 1
    targets = torch.zeros(n, K, dtype=torch.long)
    weights = torch.zeros(n, K)
    # Input position i predicts token i + 1, whose top-K the teacher gave at position i + 1.
    for i in range(len(p) - 1, n):
        ids, lps = zip(*scored.topk_prompt_logprobs[i + 1])
        targets[i] = torch.tensor(ids)
        weights[i] = torch.softmax(torch.tensor(lps), -1)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": targets, "weights": weights})


def dense_copy(datum):
    """`datum` with its loss inputs sent dense."""
    inputs = {k: types.TensorData.from_torch(v.to_torch()) for k, v in datum.loss_fn_inputs.items()}
    return types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs)


def test_top_k_distillation_trains_through_the_sdk_as_peft_does(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-distill")
    teacher = sc.create_sampling_client(base_model=MODEL_NAME).result()
    data = [teacher_datum(teacher, tokenizer, p, a) for p, a in PAIRS]
    # The SDK chose sparse for the datums with the longer prompts, dense for the others.
    sent_sparse = {d.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None for d in data}
    assert sent_sparse == {True, False}
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=3).result()
    tc.save_state("topk-initial").result()

    # forward: [N, K] logprobs, the same sent sparse or dense, and beside a one-target datum.
    one_target = make_datum(tokenizer, *PAIRS[0])
    sparse = tc.forward(data + [one_target], "cross_entropy").result()
    dense = tc.forward([dense_copy(d) for d in data], "cross_entropy").result()
    for d, s, x in zip(data, sparse.loss_fn_outputs, dense.loss_fn_outputs):
        assert s["logprobs"].shape == [d.model_input.length, K], s["logprobs"].shape
        assert s["logprobs"].tolist() == x["logprobs"].tolist()
        assert s["elementwise_loss"].shape == [d.model_input.length, K]
    assert sparse.loss_fn_outputs[-1]["logprobs"].shape == [one_target.model_input.length]

    ours = sdk_losses(tc, data, steps=STEPS, lr=LR)
    [adapter_dir] = list(server.data_dir.glob("checkpoints/*/*/weights/topk-initial"))
    first_logprobs = []
    theirs = peft_losses(adapter_dir, data, steps=STEPS, lr=LR, first_logprobs=first_logprobs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= TOLERANCE * abs(b), (step, ours, theirs)
    assert ours[-1] < ours[0], ours
    # Logprobs at step 0: within 1e-4 of peft (f32, different summation order).
    for s, want in zip(sparse.loss_fn_outputs, first_logprobs):
        assert (s["logprobs"].to_torch() - want).abs().max() < 1e-4


def test_json_clients_send_top_k_targets_dense_or_sparse(server):
    h = {"X-API-Key": "tml-distill-json"}
    post = lambda path, body: requests.post(server.url + path, json=body, headers=h).json()  # noqa: E731
    session = post("/api/v1/create_session", {})["session_id"]
    model = post("/api/v1/create_model", {"session_id": session, "base_model": MODEL_NAME,
                                          "lora_config": {"rank": 4}})
    post("/api/v1/retrieve_future", {"request_id": model["request_id"]})
    targets = [[5, 9], [0, 0], [7, 3]]
    weights = [[0.25, 0.75], [0.0, 0.0], [1.0, 0.5]]
    dense = {"target_tokens": {"data": sum(targets, []), "dtype": "int64", "shape": [3, 2]},
             "weights": {"data": sum(weights, []), "dtype": "float32", "shape": [3, 2]}}
    # Row 1 is empty: the SDK leaves out its zeros.
    sparse = {"target_tokens": {"data": [5, 9, 7, 3], "dtype": "int64", "shape": [3, 2],
                                "sparse_crow_indices": [0, 2, 2, 4], "sparse_col_indices": [0, 1, 0, 1]},
              "weights": {"data": [0.25, 0.75, 1.0, 0.5], "dtype": "float32", "shape": [3, 2],
                          "sparse_crow_indices": [0, 2, 2, 4], "sparse_col_indices": [0, 1, 0, 1]}}
    outs = []
    for inputs in (dense, sparse):
        f = post("/api/v1/forward", {"model_id": model["model_id"], "forward_input": {
            "loss_fn": "cross_entropy",
            "data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                      "loss_fn_inputs": inputs}]}})
        outs.append(post("/api/v1/retrieve_future", {"request_id": f["request_id"]}))
    assert outs[0] == outs[1], outs
    lp = outs[0]["loss_fn_outputs"][0]["logprobs"]
    assert lp["shape"] == [3, 2], lp
    el = outs[0]["loss_fn_outputs"][0]["elementwise_loss"]["data"]
    flat_weights = sum(weights, [])
    assert abs(outs[0]["metrics"]["loss:sum"] + sum(w * x for w, x in zip(flat_weights, lp["data"]))) < 1e-4
    assert all(abs(e + w * x) < 1e-5 for e, w, x in zip(el, flat_weights, lp["data"]))


def test_a_custom_loss_over_top_k_logprobs_trains_as_cross_entropy_does(server, tokenizer):
    """`forward_backward_custom` reads the [N, K] logprobs of a `forward`, and sends its gradient
    back as [N, K] `cross_entropy` weights: a custom loss equal to the top-K cross-entropy trains
    exactly as `cross_entropy` does (same seed, same initial adapter)."""
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-distill-custom")
    teacher = sc.create_sampling_client(base_model=MODEL_NAME).result()
    data = [teacher_datum(teacher, tokenizer, p, a) for p, a in PAIRS]

    def topk_cross_entropy(data, logprobs_list):
        assert all(lp.shape == (d.model_input.length, K) for d, lp in zip(data, logprobs_list))
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
        return loss, {"custom_loss": loss.item()}

    clients = [sc.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=11).result() for _ in range(2)]
    builtin = clients[0].forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    custom = clients[1].forward_backward_custom(data, topk_cross_entropy).result().metrics["custom_loss"]
    assert abs(builtin - custom) <= 1e-5 * abs(builtin), (builtin, custom)
    for tc in clients:
        tc.optim_step(types.AdamParams(learning_rate=LR)).result()
    after = [tc.forward(data, "cross_entropy").result().metrics["loss:sum"] for tc in clients]
    assert after[0] < builtin, (builtin, after)
    assert abs(after[0] - after[1]) <= 1e-5 * abs(after[0]), after
