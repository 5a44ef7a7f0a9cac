"""`csps bench serve` end to end against a fake OpenAI-compatible streaming server (FastAPI under
uvicorn in a thread), one of whose requests fails, then `csps bench compare` on the results."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from csps.bench import serve as bench_serve
from csps.cli import main

FAILING_REQUEST = 3  # the server's 4th request (the warm-up is its 1st) gets an HTTP 500


class CharTokenizer:
    """One token per byte plus a BOS, so prompt token counts are easy to check."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([256] if add_special_tokens else []) + list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")


def fake_app(bodies: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        bodies.append(body)
        if len(bodies) - 1 == FAILING_REQUEST:
            return JSONResponse({"error": {"message": "boom", "type": "InternalServerError"}},
                                status_code=500)

        async def events():
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.005)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f't{i} '}]})}\n\n"
            prompt = body["prompt"]  # text, or token ids (a BOS included)
            num_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.encode()) + 1
            usage = {"prompt_tokens": num_prompt, "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server():
    """(base URL, the request bodies the server received)."""
    bodies: list[dict] = []
    config = uvicorn.Config(fake_app(bodies), host="127.0.0.1", port=0, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}", bodies
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(autouse=True)
def char_tokenizer(monkeypatch):
    monkeypatch.setattr(bench_serve, "load_tokenizer", lambda name: CharTokenizer())


def run(url: str, tmp_path, name: str, *flags: str) -> dict:
    argv = ["bench", "serve", "--base-url", url, "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", f"{name}.json", "--label", name, "--disable-tqdm", *flags]
    assert main(argv) in (0, 1)
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_serve_counts_the_failed_request_and_compare_ranks_runs(server, tmp_path, capsys):
    url, bodies = server
    result = run(url, tmp_path, "burst", "--num-prompts", "6", "--random-input-len", "30",
                 "--random-output-len", "4", "--ignore-eos", "--num-warmups", "1",
                 "--goodput", "ttft:60000")
    assert (result["completed"], result["failed"]) == (5, 1)
    assert sum("HTTP 500: boom" in e for e in result["errors"]) == 1
    ok = [i for i, e in enumerate(result["errors"]) if not e]
    assert all(result["output_lens"][i] == 4 and len(result["itls"][i]) == 3 for i in ok)
    assert all(result["input_lens"][i] == 30 for i in ok)  # the prompts hit their lengths
    assert result["total_output_tokens"] == 20 and result["total_input_tokens"] == 150
    assert result["mean_ttft_ms"] > 0 and result["p99_itl_ms"] >= result["median_itl_ms"] > 0
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["model_id"] == "fake-model" and result["config"]["num_prompts"] == 6
    assert len(bodies) == 7 and all(b["ignore_eos"] and b["stream"] for b in bodies)
    assert bodies[0]["stream_options"] == {"include_usage": True}
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "burst.png").stat().st_size > 0

    paced = run(url, tmp_path, "paced", "--num-prompts", "4", "--random-input-len", "30",
                "--random-output-len", "4", "--request-rate", "40", "--max-concurrency", "1")
    assert (paced["completed"], paced["failed"]) == (4, 0)
    assert paced["start_times"] == sorted(paced["start_times"])
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "burst.json"), str(tmp_path / "paced.json"),
                 "--baseline", "paced", "--out-plot", str(tmp_path / "cmp.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| metric | burst | paced (baseline) |"
    ttft_row = next(line for line in lines if line.startswith("| mean TTFT (ms) |"))
    assert ttft_row.count("x)") == 1  # one ratio: burst vs the paced baseline


def test_serve_replays_a_scaled_mooncake_trace(server, tmp_path):
    url, bodies = server
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": t, "input_length": 400, "output_length": 60, "hash_ids": [0, i]}
            for i, t in enumerate((0, 1000, 2000))]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = len(bodies)
    result = run(url, tmp_path, "trace", "--dataset-name", "trace", "--dataset-path", str(trace),
                 "--time-scale", "0.05", "--length-scale", "0.05", "--max-input-len", "15")
    assert result["completed"] + result["failed"] == 3
    sent = bodies[before:]
    assert [b["max_tokens"] for b in sent] == [3, 3, 3]  # 60 * 0.05
    # token ids, since the trace shares prefix blocks: 20 clipped to 15, the BOS first
    assert all(len(b["prompt"]) == 15 and b["prompt"][0] == 256 for b in sent)
    assert sent[0]["prompt"][1:15] == sent[1]["prompt"][1:15]  # hash block 0: 26 tokens > 15
    assert result["trace_reuse"] == pytest.approx(2 / 3)
    assert result["prefix_cache_hit_rate"] is None  # this server has no /metrics
    assert result["mean_cached_tokens"] is None
    assert result["start_times"][2] == pytest.approx(0.1, abs=0.05)  # 2 s * 0.05
