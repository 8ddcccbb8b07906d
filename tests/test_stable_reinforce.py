"""`stable_reinforce` through the SDK, as tinker-cookbook's RL loops send it: sample with
`record_stability_info=True`, name each sequence in the datum's provenance spans, train.

Thinking Machines have not published the objective; loraloom's (crates/model/src/loss.rs) is
REINFORCE with truncated importance weights against the log-probabilities the server recorded
when it drew each token, plus a k3 KL(sampler ‖ policy) penalty:

  r = exp(lp - q)   (q: the token's logprob under the tempered, truncated distribution it was
                     drawn from, as recorded; never the client's `logprobs`)
  L = -Σ_t m_t · (sg(min(r, hi)) · A_t · lp_t - κ · (r - 1 - (lp - q)))

over the sampled targets (m_t = 1). The oracle is that formula in torch with transformers'
logprobs on the same weights (a fresh adapter, B = 0, computes the base model). Tolerances:
1e-4 on per-token logprobs (f32 against f32); 2e-3 on the loss sum (~30 tokens, and r depends on
each token's drawn logprob, which the decode loop computes incrementally, in another order)."""

import time

import pytest
import requests
import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from conftest import ALICE, BOB, DEFAULT_MODEL_DIR, MODEL_NAME, Server

PROMPT = [1, 504, 3437, 314, 260, 2386, 30, 5248, 17, 42]


def torch_stable_reinforce(lp, q, adv, mask, hi=2.0, kl=0.0):
    ratio = torch.exp(lp - q)
    k3 = ratio - 1 - (lp - q)
    per_token = ratio.clamp(max=hi).detach() * adv * lp - kl * k3
    return -(per_token * mask).sum()


def with_provenance(prompt, sampled, sequence_id, advantage):
    """The cookbook's datum (recipes/rl_loop.py): prompt then sample, shifted by one."""
    tokens = prompt + sampled
    n_prompt = len(prompt)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            # Deliberately wrong: the server must use what it recorded.
            "logprobs": [0.0] * (len(tokens) - 1),
            "advantages": [0.0] * (n_prompt - 1) + [advantage] * len(sampled),
        },
    )
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, length=n_prompt),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=n_prompt - 1),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=len(sampled)),
        ],
    )


def json_forward(model_id, datum, target_spans=None):
    """A JSON `forward` body for `datum` (clients without protobuf): spans as the protobuf oneof,
    `{"prompt_tokens": {...}}` / `{"sampled_tokens": {...}}`."""
    def spans(runs):
        return [{"prompt_tokens" if isinstance(r, types.PromptProvenanceSpan) else "sampled_tokens":
                 {"sequence_id": r.sequence_id, "offset": r.offset, "length": r.length}} for r in runs]

    def tensor(name, dtype):
        values = list(datum.loss_fn_inputs[name].data)
        return {"data": values, "dtype": dtype, "shape": [len(values)]}

    return {"model_id": model_id, "forward_backward_input": {"loss_fn": "stable_reinforce", "data": [{
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": datum.model_input.to_ints()}]},
        "loss_fn_inputs": {"target_tokens": tensor("target_tokens", "int64"),
                           "advantages": tensor("advantages", "float32")},
        "model_input_spans": spans(datum.model_input_spans),
        "loss_fn_input_spans": spans(target_spans if target_spans is not None else datum.loss_fn_input_spans),
    }]}}


@pytest.fixture(scope="module")
def sampled(keyed_server):
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    seqs = {}
    for temperature in (1.0, 0.7):
        params = types.SamplingParams(max_tokens=10, temperature=temperature, seed=7)
        response = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=3,
                                  sampling_params=params).result()
        seqs[temperature] = [s for s in response.sequences if len(s.tokens) >= 2]
        assert seqs[temperature], "every sequence stopped after one token"
        assert len({s.sequence_id for s in response.sequences}) == 3
    yield sc, tc, seqs
    sc.close("success").result()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_follows_the_formula_on_the_logprobs_tokens_were_drawn_with(sampled, temperature):
    """q is each token's logprob under the distribution it was drawn from: at temperature 0.7,
    log_softmax(logits / 0.7), not the temperature-1 logprob the response carries."""
    _, tc, by_temperature = sampled
    seqs = by_temperature[temperature]
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    advantages = [1.0, -0.5, 0.25][: len(seqs)]
    data = [with_provenance(PROMPT, s.tokens, s.sequence_id, a) for s, a in zip(seqs, advantages)]
    n_prompt = len(PROMPT) - 1
    for config, hi, kl in ((None, 2.0, 0.0), ({"kl_coeff": 0.1, "clip_high_threshold": 1.01}, 1.01, 0.1)):
        out = tc.forward(data, "stable_reinforce", config).result()
        want = 0.0
        for i, (seq, adv) in enumerate(zip(seqs, advantages)):
            tokens = PROMPT + seq.tokens
            targets = torch.tensor(tokens[1:])[:, None]
            with torch.no_grad():
                logits = base(torch.tensor([tokens[:-1]])).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(1, targets)[:, 0]
            drawn = torch.log_softmax(logits / temperature, -1).gather(1, targets)[:, 0]
            got_lp = torch.tensor(out.loss_fn_outputs[i]["logprobs"].data)
            assert torch.allclose(got_lp, lp, atol=1e-4)
            q = torch.cat([torch.zeros(n_prompt), drawn[n_prompt:]])
            a = torch.tensor([0.0] * n_prompt + [adv] * len(seq.tokens))
            mask = torch.tensor([0.0] * n_prompt + [1.0] * len(seq.tokens))
            want += torch_stable_reinforce(lp, q, a, mask, hi, kl).item()
        assert abs(out.metrics["loss:sum"] - want) < 2e-3, (config, out.metrics["loss:sum"], want)


def test_a_step_raises_the_logprobs_of_tokens_with_positive_advantage(sampled):
    sc, _, by_temperature = sampled
    # A run of its own (the same session), so the others keep fresh weights in any order.
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
    seq = by_temperature[1.0][0]
    data = [with_provenance(PROMPT, seq.tokens, seq.sequence_id, 1.0)]
    n_prompt = len(PROMPT) - 1
    before = tc.forward(data[:1], "stable_reinforce").result().loss_fn_outputs[0]["logprobs"].data
    tc.forward_backward(data[:1], "stable_reinforce").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    after = tc.forward(data[:1], "stable_reinforce").result().loss_fn_outputs[0]["logprobs"].data
    assert sum(after[n_prompt:]) > sum(before[n_prompt:])


def test_bad_provenance_is_a_400_naming_the_field(sampled):
    _, tc, by_temperature = sampled
    seq = by_temperature[1.0][0]
    good = with_provenance(PROMPT, seq.tokens, seq.sequence_id, 1.0)

    def refused(datum, *needles):
        with pytest.raises(tinker.BadRequestError) as e:
            tc.forward_backward([datum], "stable_reinforce").result()
        for n in needles:
            assert n in str(e.value), (n, str(e.value))

    bare = types.Datum(model_input=good.model_input, loss_fn_inputs=good.loss_fn_inputs)
    refused(bare, "data[0].loss_fn_input_spans", "record_stability_info")
    other = with_provenance(PROMPT, [seq.tokens[0] + 1] + seq.tokens[1:], seq.sequence_id, 1.0)
    refused(other, "data[0].model_input_spans[1]", "as sampled")
    unknown = with_provenance(PROMPT, seq.tokens, "no-such-request:0", 1.0)
    refused(unknown, "sequence_id", "no recorded sequence")
    prompt_advantage = types.Datum(
        model_input=good.model_input,
        loss_fn_inputs={**good.loss_fn_inputs, "advantages": [1.0] * len(good.loss_fn_inputs["target_tokens"].data)},
        model_input_spans=good.model_input_spans,
        loss_fn_input_spans=good.loss_fn_input_spans,
    )
    refused(prompt_advantage, "data[0].loss_fn_inputs.advantages", "prompt token")
    with pytest.raises(tinker.BadRequestError, match="kl_coeff"):
        tc.forward_backward([good], "stable_reinforce", {"kl_coeff": -1.0}).result()
    # The good datum still trains after all that.
    tc.forward_backward([good], "stable_reinforce").result()


def test_another_tenant_cannot_train_on_the_sequences(keyed_server, sampled):
    seq = sampled[2][1.0][0]
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=BOB)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="no recorded sequence"):
        tc.forward_backward([with_provenance(PROMPT, seq.tokens, seq.sequence_id, 1.0)],
                            "stable_reinforce").result()
    sc.close("success").result()


def test_sequences_without_record_stability_info_are_not_recorded(keyed_server, sampled):
    _, tc, _ = sampled
    sampler = tc.save_weights_and_get_sampling_client().result()
    seq = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=4, seed=1)).result().sequences[0]
    with pytest.raises(tinker.BadRequestError, match="no recorded sequence"):
        tc.forward_backward([with_provenance(PROMPT, seq.tokens, seq.sequence_id, 1.0)],
                            "stable_reinforce").result()


def test_json_clients_send_spans_as_the_protobuf_oneof(keyed_server, sampled):
    _, tc, by_temperature = sampled
    seq = by_temperature[1.0][0]
    datum = with_provenance(PROMPT, seq.tokens, seq.sequence_id, 1.0)
    h = {"X-API-Key": ALICE}
    r = requests.post(keyed_server.url + "/api/v1/forward", json=json_forward(tc.model_id, datum), headers=h)
    assert r.status_code == 200, r.text
    short = json_forward(tc.model_id, datum, datum.loss_fn_input_spans[:1])
    r = requests.post(keyed_server.url + "/api/v1/forward", json=short, headers=h)
    assert r.status_code == 400 and "loss_fn_input_spans" in r.text and "tile" in r.text, r.text


def test_recorded_sequences_survive_a_kill_9(tmp_path):
    srv = Server(tmp_path)
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key="tml-durable")
        tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=4, seed=0).result()
        sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
        seq = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                             sampling_params=types.SamplingParams(max_tokens=6, seed=3)).result().sequences[0]
        # Only acknowledged work counts: the sequence id reached the client, so it was recorded.
        srv.proc.kill()
        srv.proc.wait()
    finally:
        srv.stop()
    srv = Server(tmp_path)
    try:
        body = json_forward(tc.model_id, with_provenance(PROMPT, seq.tokens, seq.sequence_id, 1.0))
        h = {"X-API-Key": "tml-durable"}
        r = requests.post(srv.url + "/api/v1/forward", json=body, headers=h)
        assert r.status_code == 200, r.text
        deadline = time.time() + 120
        while time.time() < deadline:
            out = requests.post(srv.url + "/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]},
                                headers=h).json()
            if out.get("type") != "try_again":
                break
        assert "loss:sum" in out["metrics"], out
    finally:
        srv.stop()
