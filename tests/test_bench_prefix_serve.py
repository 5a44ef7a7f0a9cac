"""`csps bench serve` replaying a prefix-sharing trace against a fake OpenAI server that keeps an
ideal prefix cache of 16-token blocks over the token ids it gets, reports each request's
usage.prompt_tokens_details.cached_tokens and exports its counters on /metrics under csps: or
vLLM's names: the result's prefix-cache fields are the deltas of the measured run."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest

from csps.bench import serve as bench_serve
from csps.bench.trace_reuse import trace_reuse
from csps.bench.traces import read_trace, scale_records
from csps.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                reason="needlehaystack is not installed")
KV_BLOCK = 16
MODEL = "fake-model"


class CharTokenizer:
    """One token per byte plus a BOS (256)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([256] if add_special_tokens else []) + list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")


class FakeServer:
    """The app and what it saw: bodies, and the cached tokens it reported for each."""

    def __init__(self, metric_prefix: str) -> None:
        self.bodies: list[dict] = []
        self.cached: list[int] = []
        self.blocks: set[tuple[int, ...]] = set()  # chained: a block's key is its whole prefix
        registry = CollectorRegistry()
        self.queries = Counter(metric_prefix + "prefix_cache_queries", "Queried prompt tokens.",
                               ["model_name"], registry=registry).labels(MODEL)
        self.hits = Counter(metric_prefix + "prefix_cache_hits", "Hit prompt tokens.",
                            ["model_name"], registry=registry).labels(MODEL)
        self.app = FastAPI()
        self.app.get("/v1/models")(lambda: {"data": [{"id": MODEL, "object": "model"}]})
        self.app.get("/metrics")(lambda: PlainTextResponse(generate_latest(registry).decode()))
        self.app.post("/v1/completions")(self.completions)

    def lookup(self, ids: list[int]) -> int:
        """Cached tokens of a prompt (full blocks from the start), then cache its blocks."""
        found = 0
        for end in range(KV_BLOCK, len(ids) + 1, KV_BLOCK):
            if found == end - KV_BLOCK and tuple(ids[:end]) in self.blocks:
                found = end
            self.blocks.add(tuple(ids[:end]))
        return found

    async def completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else CharTokenizer().encode(prompt)
        cached = self.lookup(ids)
        self.bodies.append(body)
        self.cached.append(cached)
        self.queries.inc(len(ids))
        self.hits.inc(cached)

        async def events():
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.002)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f't{i}'}]})}\n\n"
            usage = {"prompt_tokens": len(ids), "completion_tokens": body["max_tokens"],
                     "prompt_tokens_details": {"cached_tokens": cached}}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(params=["csps:", "vllm:"])
def server(request):
    """(base URL, the fake) under each metric prefix."""
    fake = FakeServer(request.param)
    uv = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}", fake
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def trace(tmp_path):
    """Three conversations of three turns, Mooncake-style: turn t has t full 512-token blocks,
    the first t - 1 those of turn t - 1 (chained ids), and a partial block of its own."""
    rows = []
    for turn in range(3):
        for conversation in range(3):
            ids = [100 * conversation + block for block in range(turn)] + [1000 + len(rows)]
            rows.append({"timestamp": 10 * len(rows), "input_length": 512 * turn + 300,
                         "output_length": 48, "hash_ids": ids})
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_result_carries_the_measured_runs_prefix_cache_deltas(server, trace, tmp_path, capsys,
                                                              monkeypatch):
    url, fake = server
    monkeypatch.setattr(bench_serve, "load_tokenizer", lambda name: CharTokenizer())
    argv = ["bench", "serve", "--base-url", url, "--dataset-name", "trace", "--dataset-path",
            str(trace), "--length-scale", "0.125", "--time-scale", "0.01", "--num-warmups", "1",
            "--max-concurrency", "1", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "prefix.json", "--disable-tqdm"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "prefix.json").read_text())
    measured = fake.cached[1:]  # the warm-up came before the first scrape
    assert result["completed"] == 9 and result["cached_tokens"] == measured
    assert all(isinstance(b["prompt"], list) for b in fake.bodies)  # token ids, as auto picks
    assert result["prefix_cache_queries"] == result["total_input_tokens"]
    assert result["prefix_cache_hits"] == result["total_cached_tokens"] == sum(measured) > 0
    assert result["prefix_cache_hit_rate"] == pytest.approx(
        sum(measured) / result["total_input_tokens"])
    assert result["mean_cached_tokens"] == pytest.approx(sum(measured) / 9)
    # The trace's promise: every shared 64-token block (512 * 0.125, four KV blocks) hits,
    # and the warm-up's copy of request 0 its full KV blocks.
    records = scale_records(read_trace(trace), length_scale=0.125)
    promised = trace_reuse(records, 64) * result["total_input_tokens"]
    warm = records[0].input_len // KV_BLOCK * KV_BLOCK
    # Turn t shares the t - 1 full blocks of turn t - 1: one block in each last turn.
    assert result["prefix_cache_hits"] - warm == pytest.approx(promised) == 64 * 3
    assert result["trace_reuse"] == pytest.approx(trace_reuse(records, 64))
    assert "Prefix cache hit rate:" in capsys.readouterr().out
