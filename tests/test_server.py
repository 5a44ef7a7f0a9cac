"""The OpenAI-compatible server's routes and streaming, served by real uvicorn on a free port and
driven over HTTP by httpx, against the fake engine in tests/fake_engine.py."""

from __future__ import annotations

import json

import pytest
from server_harness import METRIC_NAMES, MODEL, assert_error, sse_payloads


def test_completion(client, engine):
    response = client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
        "top_k": 4, "seed": 7, "stop": "xyz", "stop_token_ids": [3], "ignore_eos": True,
        "include_stop_str_in_output": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Hello", "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    params = engine.sampling_params[engine.started_ids[-1]]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 4, 7)
    assert params.stop == ("xyz",) and params.stop_token_ids == (3,)
    assert params.ignore_eos and params.include_stop_str_in_output and params.max_tokens == 5


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_tiny_positive_values_reach_the_engine_as_1e_6(client, engine, field):
    """Under 1e-6 the fp32 sampler overflowed (logits / 1e-300 = inf) or masked every token
    (top_p 5e-324 is 0 in fp32): the request failed with a 500."""
    for value, expected in [(5e-324, 1e-6), (1e-300, 1e-6), (1e-6, 1e-6), (2e-6, 2e-6)]:
        response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1,
                                                        field: value})
        assert response.status_code == 200, response.text
        assert getattr(engine.sampling_params[engine.started_ids[-1]], field) == expected
    if field == "temperature":  # 0 stays greedy
        client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, field: 0})
        assert engine.sampling_params[engine.started_ids[-1]].temperature == 0


def test_completion_default_max_tokens_is_16(client, engine):
    body = client.post("/v1/completions", json={"prompt": "Hi", "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 16
    body = client.post("/v1/completions", json={"prompt": "Hi"}).json()  # reply ends in EOS
    assert body["choices"][0]["text"] == "Hello, world!"
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("prompt,prompt_tokens", [
    (["a", "bb"], [2, 3]), ([[1, 2], [3]], [2, 1]), ([5, 6, 7], [3])])
def test_completion_prompt_forms(client, prompt, prompt_tokens):
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3}).json()
    assert [c["index"] for c in body["choices"]] == list(range(len(prompt_tokens)))
    assert all(c["text"] == "Hel" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == sum(prompt_tokens)
    assert body["usage"]["completion_tokens"] == 3 * len(prompt_tokens)


@pytest.mark.parametrize("include_usage", [True, False])
def test_completion_stream(client, include_usage):
    response = client.post("/v1/completions", json={
        "prompt": "Hi", "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": include_usage}})
    assert response.status_code == 200
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    if include_usage:
        usage_chunk = chunks.pop()
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                        "total_tokens": 7,
                                        "prompt_tokens_details": {"cached_tokens": 0}}
    assert len(chunks) == 4  # one per generated token
    assert [c["choices"][0]["text"] for c in chunks] == list("Hell")
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_completion_stream_several_prompts(client):
    response = client.post("/v1/completions", json={
        "prompt": ["a", "b"], "max_tokens": 3, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(response)[:-1]]
    assert len(chunks) == 6
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == "Hel"
        assert [c["finish_reason"] for c in mine] == [None, None, "length"]


def test_chat_completion(client, engine):
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text",
                                                                   "text": "Hi"}]}]})
    body = response.json()
    assert response.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    template = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert body["usage"]["prompt_tokens"] == len(template)
    # default max_tokens for chat: everything that fits
    assert engine.sampling_params[engine.started_ids[-1]].max_tokens == 128 - len(template)


def test_chat_stream(client):
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3,
        "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}})
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas == [{"role": "assistant", "content": "H"}, {"content": "e"}, {"content": "l"}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_models_health_version(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert (card["id"], card["root"], card["object"]) == (MODEL, MODEL, "model")
    assert card["owned_by"] == "csps" and card["max_model_len"] == 128
    assert isinstance(card["created"], int)
    assert client.get("/health").status_code == 200
    version = client.get("/version").json()["version"]
    assert isinstance(version, str) and version


def test_metrics(client):
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in METRIC_NAMES:
        assert f"csps:{name}" in text, name
    assert f'csps:request_success_total{{finished_reason="length",model_name="{MODEL}"}}' in text
    generated = next(line for line in text.splitlines()
                     if line.startswith("csps:generation_tokens_total{"))
    assert float(generated.split()[-1]) >= 2
    assert f'csps:kv_cache_usage_perc{{model_name="{MODEL}"}} 0.25' in text


def test_openapi_documents_health_and_metrics_bodies(client):
    """Both were documented as JSON: schemathesis flagged /health's empty 200 as malformed."""
    paths = client.get("/openapi.json").json()["paths"]
    assert "content" not in paths["/health"]["get"]["responses"]["200"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert client.get("/health").content == b""


def test_tokenize_detokenize(client):
    body = client.post("/tokenize", json={"prompt": "Hi"}).json()
    assert body == {"tokens": [256, 72, 105], "count": 3, "max_model_len": 128}
    body = client.post("/tokenize", json={"prompt": "Hi", "add_special_tokens": False}).json()
    assert body["tokens"] == [72, 105]
    body = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert body["count"] == len(body["tokens"]) > 3
    assert client.post("/detokenize", json={"tokens": [72, 105]}).json() == {"prompt": "Hi"}
    assert_error(client.post("/tokenize", json={}), 400)
    assert_error(client.post("/tokenize", json={"prompt": "a", "messages": []}), 400)
    assert_error(client.post("/detokenize", json={"tokens": [72, 9999]}), 400, param="tokens")
