"""The SDK's sampling extras against a torch oracle on the same weights: top-k prompt and sample
logprobs equal `torch.topk` of `log_softmax`, `prompt_logprobs_last_n` scores only the tail,
`target_prompt_logprobs` (dense and sparse CSR) gathers the named ids, and `prompt_alt_tokens_k`
draws tokens whose logprobs are the model's (greedy at temperature 0, repeatable when seeded).

Tolerance 1e-4 on logprobs: the server and transformers run the same f32 weights on the CPU;
the differences are summation order only (observed ~1e-5)."""

import pytest
import requests
import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from conftest import DEFAULT_MODEL_DIR, MODEL_NAME

TOL = 1e-4
PROMPT = [1, 504, 3437, 314, 260, 2386, 30, 5248]


@pytest.fixture(scope="module")
def oracle():
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    model.eval()

    def log_softmax(tokens):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    return log_softmax


@pytest.fixture(scope="module")
def sampler(server):
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-extras")
    return sc.create_sampling_client(base_model=MODEL_NAME)


def close(a, b):
    return abs(a - b) < TOL


def test_topk_prompt_and_sample_logprobs_equal_torch_topk(sampler, oracle):
    k = 5
    res = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0, seed=7, stop=[]),
        include_prompt_logprobs=True, topk_prompt_logprobs=k, topk_sample_logprobs=k,
    ).result()
    lp = oracle(PROMPT)
    top = res.topk_prompt_logprobs
    assert len(top) == len(PROMPT) and top[0] is None
    for pos in range(1, len(PROMPT)):
        values, ids = torch.topk(lp[pos - 1], k)
        assert [t for t, _ in top[pos]] == ids.tolist(), pos
        assert all(close(v, w) for (_, v), w in zip(top[pos], values.tolist()))
    for seq in res.sequences:
        full = oracle(PROMPT + seq.tokens)
        assert len(seq.topk_logprobs) == len(seq.tokens)
        for i, row in enumerate(seq.topk_logprobs):
            values, ids = torch.topk(full[len(PROMPT) - 1 + i], k)
            assert [t for t, _ in row] == ids.tolist()
            assert all(close(v, w) for (_, v), w in zip(row, values.tolist()))
            # The sampled token's own logprob is consistent with the top-k row.
            assert close(seq.logprobs[i], full[len(PROMPT) - 1 + i, seq.tokens[i]].item())


def test_last_n_scores_only_the_tail(sampler, oracle):
    res = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1, temperature=0.0),
        include_prompt_logprobs=True, topk_prompt_logprobs=3, prompt_logprobs_last_n=3,
    ).result()
    lp = oracle(PROMPT)
    n = len(PROMPT)
    assert res.prompt_logprobs[: n - 3] == [None] * (n - 3)
    assert res.topk_prompt_logprobs[: n - 3] == [None] * (n - 3)
    for pos in range(n - 3, n):
        assert close(res.prompt_logprobs[pos], lp[pos - 1, PROMPT[pos]].item())
        assert res.topk_prompt_logprobs[pos][0][0] == int(lp[pos - 1].argmax())
    with pytest.raises(tinker.BadRequestError, match="prompt_logprobs_last_n"):
        sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                       sampling_params=types.SamplingParams(max_tokens=1),
                       include_prompt_logprobs=True, prompt_logprobs_last_n=len(PROMPT)).result()


def test_target_prompt_logprobs_dense_and_sparse(sampler, oracle):
    lp = oracle(PROMPT)
    # Three cells of 28: sparse enough that the SDK encodes it as CSR.
    ids = torch.full((len(PROMPT) - 1, 4), -1, dtype=torch.int64)
    ids[0, 0], ids[3, 1], ids[len(PROMPT) - 2, 0] = 42, 7, PROMPT[-1]
    sparse = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert sparse.sparse_crow_indices is not None
    for target in (types.TensorData.from_torch(ids), sparse):
        res = sampler.sample(
            types.ModelInput.from_ints(PROMPT), num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=1), target_prompt_logprobs=target,
        ).result()
        # "The same shape and layout" as the request: a sparse request is answered sparse, with
        # its own cells (to_torch densifies either).
        answer = res.target_prompt_logprobs
        assert answer.sparse_crow_indices == target.sparse_crow_indices
        assert answer.sparse_col_indices == target.sparse_col_indices
        got = answer.to_torch()
        assert list(got.shape) == [len(PROMPT) - 1, 4]
        for i in range(len(PROMPT) - 1):
            for j in range(4):
                want = 0.0 if ids[i, j] < 0 else lp[i, ids[i, j]].item()
                assert close(got[i, j].item(), want), (i, j)
    with pytest.raises(tinker.BadRequestError, match="target_prompt_logprobs"):
        sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                       sampling_params=types.SamplingParams(max_tokens=1),
                       target_prompt_logprobs=types.TensorData.from_torch(ids[:3])).result()


def test_prompt_alt_tokens_are_the_models_draws(sampler, oracle):
    lp = oracle(PROMPT)
    k = 4
    greedy = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1, temperature=0.0), prompt_alt_tokens_k=k,
    ).result().prompt_alt_tokens
    tokens, logprobs = greedy.tokens.to_torch(), greedy.logprobs.to_torch()
    assert list(tokens.shape) == list(logprobs.shape) == [len(PROMPT) - 1, k]
    assert torch.equal(tokens, lp[:-1].argmax(-1, keepdim=True).expand(-1, k))
    seeded = types.SamplingParams(max_tokens=1, temperature=1.0, seed=11)
    draws = [
        sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=seeded,
                       prompt_alt_tokens_k=k).result().prompt_alt_tokens
        for _ in range(2)
    ]
    assert torch.equal(draws[0].tokens.to_torch(), draws[1].tokens.to_torch())
    tokens, logprobs = draws[0].tokens.to_torch(), draws[0].logprobs.to_torch()
    assert torch.allclose(logprobs, lp[:-1].gather(1, tokens), atol=TOL)
    assert len(set(tokens.flatten().tolist())) > len(PROMPT) - 1, "draws vary at temperature 1"


def test_json_sample_route_carries_the_extras(server):
    r = requests.post(server.url + "/api/v1/sample", headers={"X-API-Key": "tml-extras"}, json={
        "base_model": MODEL_NAME, "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "num_samples": 1, "sampling_params": {"max_tokens": 2, "temperature": 0.0},
        "topk_prompt_logprobs": 2, "topk_sample_logprobs": 2, "prompt_alt_tokens_k": 1,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["topk_prompt_logprobs"][0] is None and len(body["topk_prompt_logprobs"][1]) == 2
    assert len(body["sequences"][0]["topk_logprobs"]) == 2
    assert body["prompt_alt_tokens"]["tokens"]["shape"] == [len(PROMPT) - 1, 1]
