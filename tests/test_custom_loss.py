"""Server-side custom losses (`ServiceClient.create_custom_loss`) through the official SDK.

The oracle is the SDK's own client-side path: the same per-datum function passed as a plain
callable to `forward_backward_custom` runs in PyTorch on the client (a forward request, torch's
autograd over the logprobs, then a backward request with weights -dL/dlogprobs). The uploaded
loss must give the same loss, the same metrics and, after an optimizer step, the same weights,
in one request. Also: the loss survives a restart, another tenant cannot use it, and a loss
calling an operation loraloom does not run is refused when it is created, naming the node.
"""

import pytest
import requests
import tinker
import torch
import torch.nn.functional as F
from tinker import types

from conftest import ALICE, BOB, MODEL_NAME, TWO_TENANTS, Server


def ppo_like(logprobs, old, adv, mask):
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    objective = torch.minimum(ratio * adv, clipped * adv) * mask
    n = mask.sum().clamp(min=1)
    loss = -objective.sum() / n + 0.01 * (logprobs ** 2).mean()
    return loss, {"custom/kl:mean": (old - logprobs).mean(), "custom/tokens:sum": n.float()}


def dpo_like(logprobs, ref, weights):
    chosen = (logprobs * weights).sum() - ref
    margin = chosen / logprobs.shape[0]
    tail = logprobs[1:]
    low = torch.where(tail < -5.0, tail ** 2, torch.zeros_like(tail)).sum()
    loss = -F.logsigmoid(0.5 * margin) + 0.001 * low + 1 - torch.sigmoid(margin)
    return loss, {"custom/margin:mean": margin.detach(), "custom/low:sum": low}


PPO_RANKS = {"logprobs": 1, "old": 1, "adv": 1, "mask": 1}
DPO_RANKS = {"logprobs": 1, "ref": 0, "weights": 1}


def ppo_data():
    rows = [list(range(300, 313)), list(range(900, 907))]
    data = []
    for i, tokens in enumerate(rows):
        n = len(tokens) - 1
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": tokens[1:],
                "old": torch.linspace(-9.0, -6.0, n),
                "adv": torch.linspace(-1.0, 1.5, n) * (1 + i),
                "mask": torch.tensor([0] * 2 + [1] * (n - 2), dtype=torch.int64),
                # Read by neither loss: the client-side path ignores it, and so does the server.
                "weights": [1.0] * n,
            },
        ))
    return data


def dpo_data():
    tokens = list(range(500, 511))
    n = len(tokens) - 1
    return [types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "ref": torch.tensor(-80.0),
            "weights": torch.linspace(0.0, 1.0, n),
        },
    )]


def client_side(fn, names):
    """`fn` as the SDK's older callable form: run per datum in PyTorch on the client."""
    def loss_fn(data, logprobs_list):
        total, sums = 0.0, {}
        for datum, logprobs in zip(data, logprobs_list):
            loss, metrics = fn(logprobs, *[datum.loss_fn_inputs[k].to_torch() for k in names])
            total = total + loss
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        n = len(data)
        return total, {k: v / n if k.endswith(":mean") else v for k, v in sums.items()}
    return loss_fn


def probe_logprobs(tc):
    tokens = list(range(300, 313))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:]})
    out = tc.forward([datum], "cross_entropy").result()
    return torch.tensor(out.loss_fn_outputs[0]["logprobs"].data)


def close(a, b, rel=1e-4):
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


def test_uploaded_losses_match_the_sdk_client_side_path_and_survive_a_restart(tmp_path):
    srv = Server(tmp_path, *TWO_TENANTS)
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        assert sc.holder.get_client_config().custom_loss_server_side
        server_tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=3).result()
        client_tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=3).result()
        before = probe_logprobs(server_tc)

        for fn, ranks, data in [(ppo_like, PPO_RANKS, ppo_data()),
                                (dpo_like, DPO_RANKS, dpo_data())]:
            handle = sc.create_custom_loss(fn, ranks).result()
            assert handle.loss_id is not None and ":loss:" in handle.loss_id
            got = server_tc.forward_backward_custom(data, handle).result()
            names = [k for k in ranks if k != "logprobs"]
            want = client_side(fn, names)
            expected = client_tc.forward_backward_custom(data, want).result()
            assert close(got.metrics["loss:sum"], expected.metrics["loss:sum"]), \
                (fn.__name__, got.metrics, expected.metrics)
            for key in [k for k in expected.metrics if k.startswith("custom/")]:
                assert close(got.metrics[key], expected.metrics[key]), (fn.__name__, key)
            # Per-datum logprobs come back as from any forward_backward.
            for g, e in zip(got.loss_fn_outputs, expected.loss_fn_outputs):
                assert torch.allclose(torch.tensor(g["logprobs"].data),
                                      torch.tensor(e["logprobs"].data), atol=1e-4)

        # Both runs accumulated the gradients of both losses: one step moves them alike.
        adam = types.AdamParams(learning_rate=1e-3)
        server_tc.optim_step(adam).result()
        client_tc.optim_step(adam).result()
        after_server, after_client = probe_logprobs(server_tc), probe_logprobs(client_tc)
        moved = (after_client - before).abs().max().item()
        assert moved > 1e-2, moved
        assert (after_server - after_client).abs().max().item() < 1e-3 * max(1.0, moved * 10)

        # Bob cannot name Alice's loss.
        bob = {"X-API-Key": BOB}
        body = {"model_id": server_tc.model_id, "forward_backward_input": {
            "data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                      "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64"}}}],
            "loss_fn": "custom", "loss_fn_config": {"loss_id": handle.loss_id}}}
        r = requests.post(srv.url + "/api/v1/forward_backward", json=body, headers=bob)
        assert r.status_code == 404, r.text
        # Alice's JSON request without the loss's inputs is refused, naming the input.
        r = requests.post(srv.url + "/api/v1/forward_backward", json=body,
                          headers={"X-API-Key": ALICE})
        assert r.status_code == 400 and "loss_fn_inputs.ref" in r.text, r.text

        loss_id, data = handle.loss_id, dpo_data()
        srv.stop()
        srv = Server(tmp_path, *TWO_TENANTS)
        # The same handle (its loss id) still works after a restart.
        sc2 = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        tc2 = sc2.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=3).result()
        again = tc2.forward_backward(data, "custom", {"loss_id": loss_id}).result()
        assert "custom/margin:mean" in again.metrics
    finally:
        srv.stop()


def test_top_k_targets_forward_only_and_refusals(tmp_path):
    srv = Server(tmp_path)
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)

        # Rank-2 logprobs ([T, K] targets) through a forward-only request: a weighted NLL equals
        # cross_entropy on the same top-K targets and weights, exactly (same kernels).
        def top_k_nll(logprobs, w):
            loss = -(logprobs * w).sum()
            return loss, {"custom/weight:sum": w.sum()}

        handle = sc.create_custom_loss(top_k_nll, {"logprobs": 2, "w": 2}).result()
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        tokens = list(range(100, 109))
        targets = torch.tensor([[t, t + 1, 7] for t in tokens[1:]])
        weights = torch.rand(8, 3)
        model_input = types.ModelInput.from_ints(tokens[:-1])
        custom = tc.forward([types.Datum(model_input=model_input,
                                         loss_fn_inputs={"target_tokens": targets, "w": weights})],
                            "custom", {"loss_id": handle.loss_id}).result()
        builtin = tc.forward([types.Datum(model_input=model_input,
                                          loss_fn_inputs={"target_tokens": targets, "weights": weights})],
                             "cross_entropy").result()
        assert close(custom.metrics["loss:sum"], builtin.metrics["loss:sum"], rel=1e-6)
        assert close(custom.metrics["custom/weight:sum"], weights.sum().item(), rel=1e-6)

        # A loss that cannot run on a datum's inputs fails its own request, naming datum and node.
        def mismatch(logprobs, w):
            return (logprobs * w).sum(), {}

        bad = sc.create_custom_loss(mismatch, {"logprobs": 1, "w": 1}).result()
        datum = types.Datum(model_input=model_input,
                            loss_fn_inputs={"target_tokens": tokens[1:], "w": torch.tensor([1.0, 2.0, 3.0])})
        with pytest.raises(Exception) as err:
            tc.forward_backward_custom([datum], bad).result()
        assert "data[0]" in str(err.value) and "node `mul`" in str(err.value), err.value

        def fourier(logprobs):
            loss = torch.fft.fft(logprobs).abs().sum()
            return loss, {}

        with pytest.raises(Exception) as err:
            sc.create_custom_loss(fourier, {"logprobs": 1}).result()
        assert "fft" in str(err.value), err.value

        # A graph sent by hand: a callee outside the list, and a metric named against the rules.
        session = sc.holder.get_session_id()
        nodes = [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
            {"op": "call_function", "name": "sys", "target": "os.system", "args": ["true"]},
            {"op": "output", "name": "output", "target": "output",
             "args": [{"tuple": [{"ref": "logprobs"}, {"dict": {}}]}]},
        ]
        body = {"session_id": session, "custom_loss_seq_id": 99, "name": "evil",
                "inputs": [{"name": "logprobs", "rank": 1}], "graph": {"format": 1, "nodes": nodes}}
        r = requests.post(srv.url + "/api/v1/create_custom_loss", json=body,
                          headers={"X-API-Key": ALICE})
        assert r.status_code == 400 and "os.system" in r.text and "graph.nodes[1]" in r.text, r.text
        nodes[1] = {"op": "call_method", "name": "s", "target": "sum", "args": [{"ref": "logprobs"}]}
        nodes[2]["args"] = [{"tuple": [{"ref": "s"}, {"dict": {"Loss": {"ref": "s"}}}]}]
        r = requests.post(srv.url + "/api/v1/create_custom_loss", json=body,
                          headers={"X-API-Key": ALICE})
        assert r.status_code == 400 and "custom/<name>:sum" in r.text, r.text
        # The server keeps serving.
        assert requests.get(srv.url + "/api/v1/healthz").ok
    finally:
        srv.stop()
