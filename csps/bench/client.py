"""One streamed request to an OpenAI-compatible server, timed: TTFT, inter-token gaps, latency.

Works with any server that streams SSE chunks as OpenAI does (csps, vLLM, SGLang, llama.cpp).
A failure (HTTP error, error event, broken stream, timeout) is recorded in the result, never
raised, so one bad request cannot stop a benchmark.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
PROMPT_FORMS = ("auto", "text", "token-ids")  # token ids: /v1/completions only


@dataclass(frozen=True, slots=True)
class ClientConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str = ""  # the served model name sent in every request
    endpoint: str = "/v1/completions"
    api_key: str | None = None  # sent as 'Authorization: Bearer KEY'
    timeout_s: float = 3600.0  # per request, the whole stream included
    ignore_eos: bool = False  # vLLM's extra body field: generate exactly max_tokens

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(slots=True)
class RequestResult:
    input_len: int  # prompt tokens: the server's usage.prompt_tokens, else the intended count
    output_len: int = 0  # usage.completion_tokens, else the number of text chunks
    ttft_s: float = 0.0  # send -> first non-empty text chunk
    itls_s: list[float] = field(default_factory=list)  # gaps between consecutive text chunks
    latency_s: float = 0.0  # send -> end of the stream
    start_s: float = 0.0  # send time, seconds after the benchmark started
    error: str = ""  # empty on success
    # usage.prompt_tokens_details.cached_tokens: prompt tokens the server's prefix cache held;
    # None when the server does not report it
    cached_tokens: int | None = None

    @property
    def success(self) -> bool:
        return not self.error


def request_body(config: ClientConfig, prompt: str | list[int], max_tokens: int) -> dict:
    """The streamed request; a token-id prompt is for /v1/completions only."""
    body: dict = {"model": config.model, "max_tokens": max_tokens, "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True}}
    if config.endpoint == "/v1/chat/completions":
        if not isinstance(prompt, str):
            raise ValueError("chat completions take a text prompt, not token ids")
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_request(client: httpx.AsyncClient, config: ClientConfig, prompt: str | list[int],
                       input_len: int, max_tokens: int, clock_start: float = 0.0) -> RequestResult:
    """Stream one request; `clock_start` is the benchmark's perf_counter() origin."""
    sent = time.perf_counter()
    result = RequestResult(input_len=input_len, start_s=sent - clock_start)
    try:
        await asyncio.wait_for(_stream(client, config, request_body(config, prompt, max_tokens),
                                       sent, result), config.timeout_s)
    except asyncio.TimeoutError:
        result.error = f"timed out after {config.timeout_s:g} s"
    except Exception as exc:  # any failure is recorded; the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency_s = time.perf_counter() - sent
    return result


async def _stream(client: httpx.AsyncClient, config: ClientConfig, body: dict, sent: float,
                  result: RequestResult) -> None:
    num_chunks, last = 0, sent
    url = config.base_url.rstrip("/") + config.endpoint
    async with client.stream("POST", url, json=body, headers=config.headers) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
            return
        async for line in response.aiter_lines():
            data = line[len("data:"):].strip() if line.startswith("data:") else ""
            if not data:
                continue
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                result.error = f"stream error: {_error_message(data.encode())}"
                return
            if _chunk_text(chunk):
                now = time.perf_counter()
                if num_chunks == 0:
                    result.ttft_s = now - sent
                else:
                    result.itls_s.append(now - last)
                num_chunks, last = num_chunks + 1, now
            usage = chunk.get("usage") or {}
            if usage.get("completion_tokens") is not None:
                result.output_len = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                result.input_len = int(usage["prompt_tokens"])
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                result.cached_tokens = int(cached)
    if num_chunks == 0 and result.output_len:
        result.ttft_s = time.perf_counter() - sent  # tokens without text (an EOS at once)
    elif num_chunks == 0:
        result.error = "the stream held no generated tokens"
    result.output_len = result.output_len or num_chunks


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or [{}]
    return choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        payload = json.loads(body)
        error = payload.get("error", payload)
        message = error.get("message", error) if isinstance(error, dict) else error
        return str(message)[:300]
    except (ValueError, AttributeError):
        return body.decode(errors="replace").strip()[:300]
