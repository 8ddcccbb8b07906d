"""The OpenAI-compatible routes (`/oai/api/v1`), driven by the official `openai` client: a trained
sampler checkpoint answers completions and chat completions with the same tokens and logprobs
as the Tinker SDK's sampling of the same prompt, chat prompts are what transformers'
`apply_chat_template` makes, and another tenant's checkpoint is not found."""

import time

import openai
import pytest
import requests
import tinker
from tinker import types
from transformers import AutoTokenizer

from conftest import DEFAULT_MODEL_DIR, MODEL_NAME, Server

ALICE = "tml-alice-oai-0123"
BOB = "tml-bob-oai-4567"


def generated(tokenizer, seq):
    """The SDK sequence's tokens without the end-of-sequence token that stopped it."""
    tokens = list(seq.tokens)
    if seq.stop_reason == "stop" and tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens.pop()
    return tokens


def test_openai_clients_sample_a_checkpoint_as_the_sdk_does(tmp_path):
    srv = Server(tmp_path, "--api-key", f"alice={ALICE}", "--api-key", f"bob={BOB}")
    try:
        tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
        service = tinker.ServiceClient(base_url=srv.url, api_key=ALICE)
        train = service.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=3).result()
        ids = tok.encode("The capital of France is Paris.", add_special_tokens=False)
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        for _ in range(2):
            train.forward_backward([datum], "cross_entropy").result()
            train.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        path = train.save_weights_for_sampler("oai").result().path
        sampler = service.create_sampling_client(model_path=path)
        client = openai.OpenAI(base_url=srv.url + "/oai/api/v1", api_key=ALICE)
        greedy = types.SamplingParams(max_tokens=12, temperature=0.0)

        # Completions: the SDK's greedy tokens, as text, with their logprobs.
        prompt = "The capital of France is"
        prompt_ids = tok(prompt)["input_ids"]  # with the tokenizer's special tokens, as vLLM encodes
        sdk = sampler.sample(types.ModelInput.from_ints(prompt_ids), 1, greedy).result().sequences[0]
        want = generated(tok, sdk)
        c = client.completions.create(model=path, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
        choice = c.choices[0]
        assert choice.text == tok.decode(want)
        assert choice.finish_reason == ("length" if sdk.stop_reason == "length" else "stop")
        # Logprobs and usage count every generated token, an end-of-sequence one included.
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(prompt_ids), len(sdk.tokens))
        assert choice.logprobs.token_logprobs == pytest.approx(sdk.logprobs, abs=1e-6)
        # Each position's alternatives hold the chosen token too.
        lp = choice.logprobs
        assert all(len(top) in (2, 3) and t in top for t, top in zip(lp.tokens, lp.top_logprobs))
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        # Token ids are a prompt too, and `<base>;<path>` names the same checkpoint.
        same = client.completions.create(model=f"{MODEL_NAME};{path}", prompt=prompt_ids, max_tokens=12,
                                         temperature=0)
        assert same.choices[0].text == choice.text

        # Several prompts: one job each, choices in order.
        both = client.completions.create(model=path, prompt=[prompt, "Hello"], max_tokens=4, temperature=0)
        assert len(both.choices) == 2 and [x.index for x in both.choices] == [0, 1]
        assert both.choices[0].text == tok.decode(sdk.tokens[:4], skip_special_tokens=True)

        # A stop string ends the text before it.
        full = choice.text
        stop = full[len(full) // 2:len(full) // 2 + 2]
        assert stop.strip(), full
        cut = client.completions.create(model=path, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.find(stop)]
        assert cut.choices[0].finish_reason == "stop"

        # Echo with logprobs and no new token scores the prompt as the SDK does.
        scored = client.completions.create(model=path, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        want_scores = sampler.compute_logprobs(types.ModelInput.from_ints(prompt_ids)).result()
        assert scored.choices[0].text == tok.decode(prompt_ids)
        got = scored.choices[0].logprobs.token_logprobs
        assert got[0] is None and want_scores[0] is None
        assert got[1:] == pytest.approx(want_scores[1:], abs=1e-5)
        assert scored.usage.completion_tokens == 0
        assert scored.choices[0].logprobs.top_logprobs[0] is None

        # Chat: transformers' rendering of the messages, then the SDK's greedy answer to it.
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        sdk_chat = sampler.sample(types.ModelInput.from_ints(chat_ids), 1, greedy).result().sequences[0]
        chat = client.chat.completions.create(model=path, messages=messages, max_tokens=12, temperature=0,
                                              logprobs=True, top_logprobs=3)
        assert chat.usage.prompt_tokens == len(chat_ids)
        assert chat.usage.completion_tokens == len(sdk_chat.tokens)
        assert chat.choices[0].message.content == tok.decode(generated(tok, sdk_chat))
        assert chat.choices[0].message.role == "assistant"
        content = chat.choices[0].logprobs.content
        assert [t.logprob for t in content] == pytest.approx(sdk_chat.logprobs[:len(content)], abs=1e-6)
        assert all(len(t.top_logprobs) == 3 for t in content)
        # Text parts are joined by newlines into one content, as vLLM joins them.
        parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                              {"type": "text", "text": "of France?"}]}]
        joined = client.chat.completions.create(model=path, messages=parts, max_tokens=12, temperature=0)
        one = [{"role": "user", "content": "What is the capital\nof France?"}]
        whole = client.chat.completions.create(model=path, messages=one, max_tokens=12, temperature=0)
        assert joined.choices[0].message.content == whole.choices[0].message.content
        assert joined.usage.prompt_tokens == whole.usage.prompt_tokens

        # Seeded draws repeat; n answers n completions.
        drawn = [client.completions.create(model=path, prompt=prompt, max_tokens=8, n=3, seed=11, temperature=1.0)
                 for _ in range(2)]
        assert len(drawn[0].choices) == 3
        assert [x.text for x in drawn[0].choices] == [x.text for x in drawn[1].choices]

        assert [m.id for m in client.models.list()] == [MODEL_NAME]

        # Another tenant's checkpoint, or another model, is not found; what loraloom does not do
        # is a 400 naming the field (OpenAI's error shape); a bad key is a 401.
        bob = openai.OpenAI(base_url=srv.url + "/oai/api/v1", api_key=BOB)
        with pytest.raises(openai.NotFoundError):
            bob.completions.create(model=path, prompt=prompt, max_tokens=1)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4o", prompt=prompt, max_tokens=1)
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=path, prompt=prompt, max_tokens=1, temperature=-1)
        assert refused.value.param == "temperature"
        long_echo = {"n": 100, "echo": True, "logprobs": 20, "max_tokens": 0, "prompt": [prompt_ids * 200]}
        for extra, field in [({"n": 0}, "n"),
                             ({"presence_penalty": 0.5}, "presence_penalty"), ({"max_tokens": 0}, "max_tokens"),
                             ({"logprobs": 99}, "logprobs"), ({"prompt": ["a", "b"], "n": 100}, "prompt"),
                             ({"suffix": "x"}, "suffix"), ({"stop": ["x"] * 65}, "stop"),
                             ({"response_format": {"type": "json_object"}}, "response_format"),
                             (long_echo, "logprobs")]:
            body = {"model": path, "prompt": prompt, "max_tokens": 1, **extra}
            r = requests.post(srv.url + "/oai/api/v1/completions", json=body,
                              headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (extra, r.text)
        for extra, field in [({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                              "messages[0].content[0]"),
                             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]:
            body = {"model": path, "messages": messages, **extra}
            r = requests.post(srv.url + "/oai/api/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (extra, r.text)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/oai/api/v1", api_key="tml-nobody-000").models.list()

        # A client that hangs up cancels its job: nothing decodes on for nobody.
        def cancelled():
            metrics = requests.get(srv.url + "/metrics", headers={"X-API-Key": ALICE}, timeout=10).text
            line = [x for x in metrics.splitlines()
                    if x.startswith('loraloom_job_failures_total{error_type="cancelled"')]
            return int(float(line[0].split()[-1])) if line else 0
        before = cancelled()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(srv.url + "/oai/api/v1/completions", timeout=2,
                          json={"model": path, "prompt": prompt, "max_tokens": 4000, "temperature": 0},
                          headers={"Authorization": f"Bearer {ALICE}"})
        deadline = time.time() + 60
        while cancelled() == before:
            assert time.time() < deadline, "the abandoned job was not cancelled"
            time.sleep(0.2)
    finally:
        srv.stop()
