"""The real server's sampling surface over HTTP: echo + logprobs as lm-evaluation-harness
scores with them, chat logprobs, n samples (full and streamed), penalties and logit_bias."""

from __future__ import annotations

import json

import httpx
import pytest
from test_server_e2e import MODEL, ServerProcess


@pytest.fixture(scope="module")
def server(real_model_dir):
    srv = ServerProcess(real_model_dir, "--max-num-seqs", "16")
    yield srv
    srv.stop()


def post(server, path: str, **body) -> dict:
    reply = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=180)
    assert reply.status_code == 200, reply.text
    return reply.json()


def stream(server, path: str, **body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={"model": MODEL, "stream": True, **body},
                      timeout=60) as reply:
        assert reply.status_code == 200
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_echo_logprobs_score_the_prompt(server):
    prompt = "The capital of France is Paris"
    body = post(server, "/v1/completions", prompt=prompt, max_tokens=1, temperature=0,
                logprobs=1, echo=True)
    choice = body["choices"][0]
    num_prompt = body["usage"]["prompt_tokens"]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == num_prompt + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    # the generated token's logprob is the same with and without echo
    plain = post(server, "/v1/completions", prompt=prompt, max_tokens=1, temperature=0,
                 logprobs=1)["choices"][0]["logprobs"]
    assert plain["token_logprobs"][0] == pytest.approx(lp["token_logprobs"][-1], abs=1e-5)
    # greedy: the generated token is its position's top alternative
    top = lp["top_logprobs"][-1]
    assert max(top, key=top.get) == lp["tokens"][-1]


def test_chat_logprobs_and_top_logprobs(server):
    body = post(server, "/v1/chat/completions", temperature=0, max_tokens=8, logprobs=True,
                top_logprobs=2, messages=[{"role": "user", "content": "Say hello."}])
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in content)  # greedy
    text = "".join(e["token"] for e in content)
    assert choice["message"]["content"] in text  # the EOS token's text may follow


def test_n_samples_full_and_streamed(server):
    body = post(server, "/v1/completions", prompt=["Once upon a time", "In a galaxy"], n=2,
                max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 4 * 6
    chat = dict(messages=[{"role": "user", "content": "Name a colour."}], n=3, max_tokens=6,
                temperature=1.0, seed=5, ignore_eos=True, logprobs=True)
    full = post(server, "/v1/chat/completions", **chat)
    texts = [c["message"]["content"] for c in full["choices"]]
    assert [c["index"] for c in full["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    chunks = stream(server, "/v1/chat/completions", **chat)
    streamed, counts = ["", "", ""], [0, 0, 0]
    for chunk in chunks:
        (choice,) = chunk["choices"]
        streamed[choice["index"]] += choice["delta"].get("content", "")
        counts[choice["index"]] += len(choice["logprobs"]["content"])
    assert streamed == texts and counts == [6, 6, 6]


def test_logit_bias_and_penalties_steer_output(server):
    base = dict(prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, ignore_eos=True)
    greedy = post(server, "/v1/completions", **base)["choices"][0]["text"]
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": " 5"}).json()["tokens"]
    banned = post(server, "/v1/completions", logit_bias={str(tokens[-1]): -100}, **base)
    assert " 5" in greedy and " 5" not in banned["choices"][0]["text"]
    penalised = post(server, "/v1/completions", frequency_penalty=2.0, **base)
    assert penalised["choices"][0]["text"] != greedy
    server.wait_idle()


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colour": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
    "required": ["name", "age", "colour", "tags"], "additionalProperties": False}


def test_json_schema_holds_in_20_of_20_samples(server):
    import jsonschema

    body = post(server, "/v1/chat/completions", n=20, temperature=1.0, seed=0, max_tokens=200,
                messages=[{"role": "user", "content": "Describe a person as JSON."}],
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "person", "schema": PERSON}})
    assert len(body["choices"]) == 20
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    objects = post(server, "/v1/chat/completions", n=8, temperature=1.0, seed=1,
                   max_tokens=120, messages=[{"role": "user", "content": "Give me JSON."}],
                   response_format={"type": "json_object"})["choices"]
    assert all(c["message"]["content"].lstrip().startswith("{") for c in objects)
    stopped = [c for c in objects if c["finish_reason"] == "stop"]  # seed 1: 3 of the 8
    assert stopped  # seeds 0-4 stop 0-3 of 4 samples within 120 tokens: 8 leave a margin
    assert all(isinstance(json.loads(c["message"]["content"]), dict) for c in stopped)
    bad = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    server.wait_idle()
