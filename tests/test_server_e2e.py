"""The real server (`python -m csps.server`, a separate process) on the real model, driven by a
real HTTP client: answers, concurrency, bad input, disconnects, a full queue, and the KV books."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csps.server", str(model_dir), "--served-model-name", MODEL,
             "--port", str(self.port), "--max-model-len", "1024",
             "--kv-cache-memory-bytes", "256M", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def metric(self, name: str, **labels: str) -> float:
        """The value of csps:NAME (the series carrying `labels`, if given) from /metrics."""
        text = httpx.get(self.url + "/metrics").text
        for match in re.finditer(rf"^csps:{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
            if all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
                return float(match.group(2))
        raise AssertionError(f"csps:{name}{labels} missing from /metrics")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Assert that every KV block is free again (requests finished or aborted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("kv_cache_usage_perc") == 0 and self.metric("num_requests_running") == 0:
                return
            time.sleep(0.1)
        raise AssertionError("KV blocks still allocated after the requests ended")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(real_model_dir):
    srv = ServerProcess(real_model_dir, "--max-num-seqs", "32")
    yield srv
    srv.stop()


def test_chat_answers_paris(server):
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "temperature": 0, "max_tokens": 32,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert reply.status_code == 200
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    server.wait_idle()


async def stream_completion(client: httpx.AsyncClient, url: str, prompt: str) -> list[str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True}
    pieces = []
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return pieces


def test_32_concurrent_streams_match_one_at_a_time(server):
    prompts = [f"Write a sentence about the number {i}:" for i in range(32)]

    async def run(concurrent: bool) -> list[list[str]]:
        async with httpx.AsyncClient(timeout=300) as client:
            if concurrent:
                return await asyncio.gather(*(stream_completion(client, server.url, p)
                                              for p in prompts))
            return [await stream_completion(client, server.url, p) for p in prompts]

    together = asyncio.run(run(concurrent=True))
    alone = asyncio.run(run(concurrent=False))
    assert all(len(pieces) == 12 for pieces in together)  # one chunk per token
    assert ["".join(p) for p in together] == ["".join(p) for p in alone]
    server.wait_idle()


@pytest.mark.parametrize("body,status", [
    ("{not json", 400),
    ({"model": MODEL, "prompt": 5}, 400),
    ({"model": "no-such-model", "prompt": "hi"}, 404),
    ({"model": MODEL, "prompt": ""}, 400),
    ({"model": MODEL, "prompt": "hi " * 2000}, 400),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400),
    ({"model": MODEL, "prompt": "hi", "temperature": float("nan")}, 400),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400),
])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, body, status):
    content = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    ok = httpx.post(server.url + "/v1/completions", timeout=30,
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
    server.wait_idle()


def test_disconnect_mid_stream_frees_kv_and_counts_an_abort(server):
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 500,
            "ignore_eos": True, "stream": True}
    aborted = server.metric("request_success_total", finished_reason="abort")
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        chunks = [next(lines) for _ in range(6)]
        assert any(c.startswith("data: ") for c in chunks)
        assert server.metric("kv_cache_usage_perc") > 0
    server.wait_idle()
    deadline = time.monotonic() + 10  # booked by the engine thread right after it frees the KV
    while server.metric("request_success_total", finished_reason="abort") == aborted:
        assert time.monotonic() < deadline, "the abort was not counted"
        time.sleep(0.05)
    assert server.metric("request_success_total", finished_reason="abort") == aborted + 1


def test_full_queue_answers_503(real_model_dir):
    srv = ServerProcess(real_model_dir, "--max-num-seqs", "1", "--max-waiting-requests", "1")
    long_body = {"model": MODEL, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True,
                 "stream": True}

    async def hold(client: httpx.AsyncClient, streaming: asyncio.Event) -> None:
        async with client.stream("POST", srv.url + "/v1/completions", json=long_body) as reply:
            async for _ in reply.aiter_lines():
                streaming.set()

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as client:
            running = asyncio.Event()
            tasks = [asyncio.create_task(hold(client, running))]
            await asyncio.wait_for(running.wait(), 30)
            tasks.append(asyncio.create_task(hold(client, asyncio.Event())))
            for _ in range(200):  # the second request queues behind the first
                if srv.metric("num_requests_waiting") >= 1:
                    break
                await asyncio.sleep(0.05)
            refused = await client.post(srv.url + "/v1/completions",
                                        json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            for task in tasks:  # hang up on both: the server aborts them
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return refused

    try:
        refused = asyncio.run(scenario())
        assert refused.status_code == 503
        assert "busy" in refused.json()["error"]["message"].lower()
        srv.wait_idle()
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
