"""Streamed OpenAI completions (`"stream": true`), read with the official `openai` client: the
text a stream delivers, chunk after chunk, is the text of the same request answered whole
(greedy, seeded draws, stop strings, several prompts and choices, echo), as are its logprobs,
finish reasons and usage; a stream comes in many chunks, the first while its job still runs; a
client that hangs up mid-stream cancels its job; what a stream cannot do is a 400 naming the
field."""

import json
import time

import openai
import pytest
import requests

from conftest import ALICE, MODEL_NAME

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def client(server):
    return openai.OpenAI(base_url=server.url + "/oai/api/v1", api_key=ALICE)


def texts_of(chunks, n):
    """Each choice's text, joined from a completions stream's chunks."""
    out = [""] * n
    for c in chunks:
        for ch in c.choices:
            out[ch.index] += ch.text
    return out


def finishes_of(chunks, n):
    out = [None] * n
    for c in chunks:
        for ch in c.choices:
            if ch.finish_reason is not None:
                assert out[ch.index] is None, "one finish_reason per choice"
                out[ch.index] = ch.finish_reason
    return out


# Logprobs of two requests for the same tokens agree to f32 rounding, not bit for bit: the second
# may start from the first's kept keys and values (the prefix cache), computed in another batch
# shape. 1e-4, as the sampling oracles allow a request in a crowd against the request alone.
LOGPROB_TOL = 1e-4


def test_a_streamed_completion_is_the_whole_answer_in_pieces(keyed_server):
    oai = client(keyed_server)
    whole = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=2)
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                         logprobs=2, stream=True))
    assert texts_of(chunks, 1) == [whole.choices[0].text]
    assert finishes_of(chunks, 1) == [whole.choices[0].finish_reason]
    # It came token by token, not at the end.
    with_text = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(with_text) >= len(whole.choices[0].text.split()) // 2, [c.choices[0].text for c in chunks]
    assert all(c.object == "text_completion" and c.id == chunks[0].id and c.model == MODEL_NAME for c in chunks)
    # Logprobs of every generated token, in order, with alternatives and running text offsets.
    lp = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    want = whole.choices[0].logprobs
    assert sum((x.tokens for x in lp), []) == want.tokens
    assert sum((x.token_logprobs for x in lp), []) == pytest.approx(want.token_logprobs, abs=LOGPROB_TOL)
    assert sum((x.text_offset for x in lp), []) == want.text_offset
    got_top, want_top = sum((x.top_logprobs for x in lp), []), want.top_logprobs
    assert [sorted(t) for t in got_top] == [sorted(t) for t in want_top]
    assert [t[k] for t in got_top for k in sorted(t)] == \
        pytest.approx([t[k] for t in want_top for k in sorted(t)], abs=LOGPROB_TOL)


def test_stop_strings_seeds_several_prompts_and_echo_stream_as_they_answer(keyed_server):
    oai = client(keyed_server)
    whole = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0)
    full, tokens = whole.choices[0].text, whole.choices[0].logprobs.tokens
    # A stop string that begins with the last character of one token and ends in the next: the
    # stream ends before it, never having sent that character with its token.
    starts = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    i = next(i for i in range(1, len(tokens) - 1)
             if tokens[i] and len(tokens[i + 1]) >= 2
             and full.find(tokens[i][-1] + tokens[i + 1][:2]) == starts[i + 1] - 1)
    stop = tokens[i][-1] + tokens[i + 1][:2]
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                         stop=[stop, "never in it"], stream=True))
    assert texts_of(chunks, 1) == [full[:full.find(stop)]]
    assert finishes_of(chunks, 1) == ["stop"]

    # Seeded draws at temperature 1: many random tokens (characters split across tokens among
    # them), several prompts and choices, each choice's text as answered whole.
    request = dict(model=MODEL_NAME, prompt=[PROMPT, "Bonjour, je m'appelle", "🙂 emoji"], max_tokens=40,
                   temperature=1.0, n=3, seed=7)
    whole = oai.completions.create(**request)
    chunks = list(oai.completions.create(**request, stream=True))
    assert texts_of(chunks, 9) == [c.text for c in whole.choices]
    assert finishes_of(chunks, 9) == [c.finish_reason for c in whole.choices]

    # Characters whose bytes span several tokens (emoji, kana: greedy continuations of these
    # prompts hold many) go out whole: no chunk holds a replacement character the text lacks.
    for prompt in ["Emojis: 😀 😃 😄 😁 😆", "日本語の文章：東京は日本の首都です。大阪は"]:
        whole = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0)
        text = whole.choices[0].text
        assert len(text.encode()) > 2 * len(text.strip()), text  # mostly multi-byte characters
        chunks = list(oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                             stream=True))
        assert texts_of(chunks, 1) == [text]
        assert sum(c.choices[0].text.count("\ufffd") for c in chunks if c.choices) == text.count("\ufffd")
        assert len([c for c in chunks if c.choices and c.choices[0].text]) > 3

    # Echo: each choice opens with its prompt.
    echoed = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                         stream=True, stream_options={"include_usage": True}))
    want = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed[0].choices[0].text == PROMPT
    assert texts_of(echoed, 1) == [want.choices[0].text]
    assert echoed[-1].choices == [] and echoed[-1].usage.model_dump() == want.usage.model_dump()


def test_a_streamed_chat_is_the_whole_answer_in_pieces(keyed_server):
    oai = client(keyed_server)
    request = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=0, logprobs=True, top_logprobs=2)
    whole = oai.chat.completions.create(**request)
    chunks = list(oai.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content],
                                                          abs=LOGPROB_TOL)
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    # Usage: null on every chunk but the last, which has no choices.
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # n seeded choices, each whole.
    seeded = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0.9, n=2, seed=3)
    whole = oai.chat.completions.create(**seeded)
    got = ["", ""]
    for c in oai.chat.completions.create(**seeded, stream=True):
        for ch in c.choices:
            got[ch.index] += ch.delta.content or ""
    assert got == [c.message.content for c in whole.choices]


def test_a_stream_comes_while_its_job_runs_and_hanging_up_cancels_it(keyed_server):
    def cancelled():
        metrics = requests.get(keyed_server.url + "/metrics", headers={"X-API-Key": ALICE}, timeout=10).text
        line = [x for x in metrics.splitlines()
                if x.startswith('loraloom_job_failures_total{error_type="cancelled"')]
        return int(float(line[0].split()[-1])) if line else 0

    before = cancelled()
    # Sent with the SDK's idempotency header too: a stream is never held back to be remembered.
    r = requests.post(keyed_server.url + "/oai/api/v1/completions", stream=True, timeout=60,
                      json={"model": MODEL_NAME, "prompt": "1, 2, 3, 4,", "max_tokens": 2000, "temperature": 0,
                            "stream": True},
                      headers={"Authorization": f"Bearer {ALICE}", "X-Idempotency-Key": "stream-1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith(b"data: "))
    assert json.loads(first[len(b"data: "):])["choices"][0]["finish_reason"] is None
    # The job was still running when its first chunk came: hanging up cancels it.
    r.close()
    deadline = time.time() + 60
    while cancelled() == before:
        assert time.time() < deadline, "the abandoned stream's job was not cancelled"
        time.sleep(0.2)


def test_what_a_stream_cannot_do_is_refused_naming_the_field(keyed_server):
    headers = {"Authorization": f"Bearer {ALICE}"}
    for body, field in [({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"stream": True, "stream_options": {"include_usage": "yes"}},
                         "stream_options.include_usage"),
                        ({"stream": True, "echo": True, "logprobs": 1}, "logprobs"),
                        ({"stream": True, "n": 0}, "n")]:
        r = requests.post(keyed_server.url + "/oai/api/v1/completions", headers=headers, timeout=30,
                          json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
    # Another model is not found before any stream starts.
    with pytest.raises(openai.NotFoundError):
        client(keyed_server).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
