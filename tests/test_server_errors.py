"""Bad input and faults at the HTTP server: OpenAI-style 4xx/5xx bodies, the server still
serving afterwards, aborts on client disconnect, a dead engine, the API key."""

from __future__ import annotations

import json

import httpx
import pytest
from fake_engine import FakeEngine  # tests/ has no __init__.py: pytest puts it on sys.path
from server_harness import MODEL, assert_error, serve, sse_payloads, wait_for

BAD_COMPLETIONS = [  # (json body, status, param, code)
    ({"prompt": "Hi", "max_tokens": "abc"}, 400, "max_tokens", None),
    ({"max_tokens": 3}, 400, "prompt", None),
    ({"prompt": {"text": "Hi"}}, 400, "prompt", None),
    ({"prompt": [1, "a"]}, 400, "prompt", None),
    ({"prompt": "Hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": ""}, 400, "prompt", None),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": ["ok", ""]}, 400, "prompt", None),
    ({"prompt": [[]]}, 400, "prompt", None),
    ({"prompt": "x" * 200}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": "x" * 100, "max_tokens": 100}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None),
    ({"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens", None),
    ({"prompt": "Hi", "n": 0}, 400, "n", None),
    ({"prompt": "Hi", "n": 129}, 400, "n", None),  # n=10**9 queued 10**9 requests
    ({"prompt": "Hi", "seed": 2**63}, 400, "seed", None),  # was a 500 from manual_seed
    ({"prompt": "Hi", "seed": -(2**63) - 1}, 400, "seed", None),
    ({"prompt": "Hi", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
    ({"prompt": "Hi", "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    ({"prompt": "Hi", "logprobs": 21}, 400, "logprobs", None),
    ({"prompt": "Hi", "echo": True, "prompt_logprobs": -1}, 400, "prompt_logprobs", None),
    ({"prompt": "Hi", "presence_penalty": 2.5}, 400, "presence_penalty", None),
    ({"prompt": "Hi", "frequency_penalty": -3}, 400, "frequency_penalty", None),
    ({"prompt": "Hi", "repetition_penalty": 0}, 400, "repetition_penalty", None),
    ({"prompt": "Hi", "min_p": 1.5}, 400, "min_p", None),
    ({"prompt": "Hi", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens", None),
    ({"prompt": "Hi", "logit_bias": {"x": 1}}, 400, "logit_bias", None),
    ({"prompt": "Hi", "logit_bias": {"1": 101}}, 400, "logit_bias", None),
    ({"prompt": "Hi", "logit_bias": {"999": 1}}, 400, "logit_bias", None),
    ({"prompt": [1, 999]}, 400, "prompt", None),
    ({"prompt": [[1], [-1]]}, 400, "prompt", None),
    ({"prompt": "Hi", "temperature": -1}, 400, "temperature", None),
    ({"prompt": "Hi", "top_p": 2}, 400, "top_p", None),
    ({"prompt": "Hi", "stop": [""]}, 400, "stop", None),
]
BAD_CHATS = [
    ({"model": MODEL}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"content": "Hi"}]}, 400, "messages", None),
    ({"messages": "Hi"}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": "x" * 200}]}, 400, "messages",
     "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 500}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, 400, "top_logprobs",
     None),
    ({"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 30},
     400, "top_logprobs", None),
    ({"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "xml"}},
     400, "response_format", None),
    ({"messages": [{"role": "user", "content": "Hi"}],
      "response_format": {"type": "json_schema"}}, 400, "response_format", None),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}, 400,
     "tools", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "Hi"}], "model": "nope"}, 404, "model",
     "model_not_found"),
]


def assert_still_serving(client) -> None:
    assert client.get("/health").status_code == 200
    body = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()
    assert body["choices"][0]["text"] == "He"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body,status,param,code", BAD_COMPLETIONS)
def test_bad_completion_requests(client, engine, body, status, param, code, stream):
    num_started = len(engine.started_ids)
    assert_error(client.post("/v1/completions", json={**body, "stream": stream}), status,
                 param, code)
    assert len(engine.started_ids) == num_started  # rejected before reaching the engine


@pytest.mark.parametrize("body,status,param,code", BAD_CHATS)
def test_bad_chat_requests(client, body, status, param, code):
    assert_error(client.post("/v1/chat/completions", json=body), status, param, code)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_malformed_and_non_object_json(client, path):
    headers = {"content-type": "application/json"}
    assert_error(client.post(path, content=b'{"prompt": "Hi",', headers=headers), 400)
    assert_error(client.post(path, content=b'["Hi"]', headers=headers), 400)
    assert_still_serving(client)


def test_unknown_route_and_no_chat_template(client, engine):
    assert_error(client.get("/v1/nothing"), 404)
    engine.tokenizer.has_chat_template = False
    response = client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "Hi"}]})
    assert "chat template" in assert_error(response, 400, "messages")["message"]
    assert_still_serving(client)


def test_engine_errors_map_to_statuses(client, engine):
    engine.fail_with = ValueError("The fake engine cannot serve this.")
    error = assert_error(client.post("/v1/completions", json={"prompt": "Hi"}), 400)
    assert error["message"] == "The fake engine cannot serve this."
    engine.fail_with = RuntimeError("boom")
    for stream in (False, True):
        error = assert_error(client.post("/v1/completions",
                                         json={"prompt": "Hi", "stream": stream}), 500)
        assert "boom" not in error["message"] and error["code"] == "internal_error"
    engine.fail_with = None
    assert_still_serving(client)


def test_engine_failure_mid_stream_sends_error_event(client, engine):
    engine.fail_after_tokens = 2
    response = client.post("/v1/completions",
                           json={"prompt": "Hi", "max_tokens": 5, "stream": True})
    payloads = sse_payloads(response)
    assert [json.loads(p)["choices"][0]["text"] for p in payloads[:2]] == ["H", "e"]
    assert json.loads(payloads[2])["error"]["type"] == "server_error"
    assert payloads[3:] == ["[DONE]"]


def test_queue_full_is_503(client, engine):
    engine.max_waiting_requests, engine.token_delay_s = 1, 0.02
    body = {"prompt": "Hi", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as streaming:
        lines = streaming.iter_lines()  # NOTE: dropping the iterator closes the connection
        assert next(lines).startswith("data: ")
        response = client.post("/v1/completions", json={"prompt": "Hi"})
        assert_error(response, 503, code="queue_full")
    assert wait_for(lambda: not engine.running)
    assert_still_serving(client)


def test_client_disconnect_mid_stream_aborts(client, engine):
    engine.token_delay_s = 0.02
    body = {"prompt": "Hi", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as streaming:
        lines = streaming.iter_lines()
        received = [next(lines) for _ in range(6)]  # three events, each ended by a blank line
        assert [line[:6] for line in received] == ["data: ", ""] * 3
        request_id = engine.started_ids[-1]
    assert wait_for(lambda: request_id in engine.aborted_ids), "engine never saw the abort"
    assert request_id not in engine.running
    assert_still_serving(client)


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_before_response_aborts(client, engine, stream):
    """Non-streaming: the client leaves mid-generation. Streaming: it leaves before the first
    token (the response waits for it, so that early errors still get a status code)."""
    engine.token_delay_s = 0.5 if stream else 0.02
    body = {"prompt": "Hi", "max_tokens": 100, "ignore_eos": True, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json=body, timeout=0.25)
    request_id = engine.started_ids[-1]
    assert wait_for(lambda: request_id in engine.aborted_ids), "engine never saw the abort"
    assert_still_serving(client)


def test_dead_engine_is_503():
    engine = FakeEngine(model_name=MODEL)
    with serve(engine) as client:
        assert engine.is_started
        engine.kill()
        assert_error(client.get("/health"), 503, code="engine_dead")
        assert_error(client.post("/v1/completions", json={"prompt": "Hi"}), 503,
                     code="engine_dead")
        assert client.get("/metrics").status_code == 200
    assert not engine.is_started  # shut down with the server


def test_api_key():
    engine = FakeEngine(model_name=MODEL)
    with serve(engine, api_key="sesame") as client:
        for path in ("/v1/models",):
            assert_error(client.get(path), 401, code="invalid_api_key")
            assert_error(client.get(path, headers={"Authorization": "Bearer nope"}), 401)
            assert client.get(path, headers={"Authorization": "Bearer sesame"}).status_code == 200
        for path, body in [("/v1/completions", {"prompt": "Hi"}), ("/tokenize", {"prompt": "a"}),
                           ("/v1/chat/completions", {"messages": []}),
                           ("/detokenize", {"tokens": [1]})]:
            assert_error(client.post(path, json=body), 401)
        good = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                           headers={"Authorization": "Bearer sesame"})
        assert good.json()["choices"][0]["text"] == "H"
        for path in ("/health", "/version", "/metrics"):
            assert client.get(path).status_code == 200


@pytest.mark.parametrize("path,fields", [
    ("/v1/completions", '"prompt": "Hi"'),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}]')])
@pytest.mark.parametrize("param,literal", [("temperature", "NaN"), ("temperature", "Infinity"),
                                           ("temperature", "-Infinity"), ("top_p", "NaN")])
def test_non_finite_floats_are_refused_and_the_server_keeps_serving(client, path, fields,
                                                                    param, literal):
    """Issue 15's report: a NaN temperature (JSON's NaN literal, as curl sends it) reached the
    sampler, answered 500 and killed the engine. Now a 400 naming the parameter."""
    body = f'{{{fields}, "max_tokens": 2, "{param}": {literal}}}'
    reply = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(reply, 400, param, None)
    assert_still_serving(client)
