"""Test harness for the HTTP server: the fake engine under real uvicorn on a free port, an
httpx client bound to it, and checks of SSE framing and OpenAI error bodies."""

from __future__ import annotations

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
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
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
