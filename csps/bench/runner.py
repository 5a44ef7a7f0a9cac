"""Drives a workload against a server: sends each request at its arrival time, at most
`max_concurrency` at once (later arrivals wait for a free slot, as in `vllm bench serve`),
after optional warm-up requests, with a progress bar; the server's prefix-cache counters are
read just before the first send and after the last response."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from csps.bench.client import ClientConfig, RequestResult, send_request
from csps.bench.prefix_cache_stats import PrefixCacheCounters, scrape_prefix_cache


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    arrival_s: float  # send time, seconds after the start
    prompt: str | list[int]  # text, or token ids sent as they are (completions only)
    input_len: int  # prompt tokens as built (the server's count replaces it when reported)
    max_tokens: int


@dataclass(frozen=True, slots=True)
class RunOutcome:
    results: list[RequestResult]  # in send order
    duration_s: float  # first send -> last response finished
    # the server's prefix-cache counters just before the first send and after the last
    # response (None: no /metrics, or no such counters)
    prefix_cache_before: PrefixCacheCounters | None = None
    prefix_cache_after: PrefixCacheCounters | None = None


async def run_benchmark(requests: list[PreparedRequest], config: ClientConfig,
                        max_concurrency: int | None = None, num_warmups: int = 0,
                        show_progress: bool = True) -> RunOutcome:
    """Send every request; raises RuntimeError only when all warm-up requests fail."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=None)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(config.timeout_s)) as client:
        if num_warmups and requests:
            await _warm_up(client, config, requests[0], num_warmups, slots)
        before = await scrape_prefix_cache(client, config.base_url, config.model, config.headers)
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not show_progress)
        start = time.perf_counter()

        async def send_at_arrival(request: PreparedRequest) -> RequestResult:
            delay = start + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with slots or contextlib.nullcontext():
                result = await send_request(client, config, request.prompt, request.input_len,
                                            request.max_tokens, start)
            bar.update(1)
            return result

        results = await asyncio.gather(*(send_at_arrival(r) for r in requests))
        duration_s = time.perf_counter() - start
        bar.close()
        after = await scrape_prefix_cache(client, config.base_url, config.model, config.headers)
    return RunOutcome(list(results), duration_s, before, after)


async def _warm_up(client: httpx.AsyncClient, config: ClientConfig, request: PreparedRequest,
                   num_warmups: int, slots: asyncio.Semaphore | None) -> None:
    async def one() -> RequestResult:
        async with slots or contextlib.nullcontext():
            return await send_request(client, config, request.prompt, request.input_len,
                                      request.max_tokens)

    results = await asyncio.gather(*(one() for _ in range(num_warmups)))
    if not any(r.success for r in results):
        raise RuntimeError(f"every warm-up request failed; the first error: {results[0].error}")
