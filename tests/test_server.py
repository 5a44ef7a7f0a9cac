"""The OpenAI-compatible server, served by real uvicorn on a free port and driven over HTTP by
httpx, against the fake engine in tests/fake_engine.py."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fake_engine import FakeEngine  # tests/ has no __init__.py: pytest puts it on sys.path

from csps.server import create_app

MODEL = "fake-model"
METRIC_NAMES = [
    "time_to_first_token_seconds", "inter_token_latency_seconds",
    "request_time_per_output_token_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
    "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total",
    "prompt_tokens_total", "generation_tokens_total", "request_success_total",
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
]


@contextmanager
def serve(engine: FakeEngine, api_key: str | None = None):
    """Run create_app(engine) under uvicorn in a thread; yield an httpx client bound to it."""
    config = uvicorn.Config(create_app(engine, api_key=api_key), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(model_name=MODEL, max_model_len=128)
    with serve(engine) as client:
        yield engine, client


@pytest.fixture
def engine(served):
    engine = served[0]
    yield engine
    engine.token_delay_s, engine.fail_with, engine.fail_after_tokens = 0.0, None, None
    engine.max_waiting_requests = 64
    engine.tokenizer.has_chat_template = True


@pytest.fixture
def client(served, engine):
    return served[1]


def sse_payloads(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing exactly."""
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), text
    return [event[len("data: "):] for event in events]


def assert_error(response: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


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
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    params = engine.sampling_params[engine.started_ids[-1]]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 4, 7)
    assert params.stop == ("xyz",) and params.stop_token_ids == (3,)
    assert params.ignore_eos and params.include_stop_str_in_output and params.max_tokens == 5


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
                                        "total_tokens": 7}
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
    ({"prompt": "Hi", "n": 2}, 400, "n", "unsupported_parameter"),
    ({"prompt": "Hi", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
    ({"prompt": "Hi", "logprobs": 1}, 400, "logprobs", "unsupported_parameter"),
    ({"prompt": "Hi", "echo": True}, 400, "echo", "unsupported_parameter"),
    ({"prompt": "Hi", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
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
    ({"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}, 400, "logprobs",
     "unsupported_parameter"),
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
