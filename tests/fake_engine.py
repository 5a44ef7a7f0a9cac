"""A fake AsyncLLMEngine for server tests: a byte-level tokenizer and scripted output tokens.

It has the shape csps/server programs against (generate / abort / is_healthy / stat loggers /
get_stats), generates the bytes of `reply` one token at a time, and records what happened
(started requests, sampling params, aborts) for tests to assert on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from csps.engine.errors import EngineDeadError, QueueFullError
from csps.engine.outputs import (
    CompletionOutput,
    FinishedRequestStats,
    IterationStats,
    RequestOutput,
)
from csps.request import SamplingParams


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is BOS, 257 is EOS."""

    bos_token_id = 256
    eos_token_id = 257

    def __init__(self, has_chat_template: bool = True) -> None:
        self.has_chat_template = has_chat_template

    def __len__(self) -> int:
        return 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True):
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


class FakeEngine:
    def __init__(self, model_name: str = "fake-model", max_model_len: int = 128,
                 reply: str = "Hello, world!", token_delay_s: float = 0.0,
                 max_waiting_requests: int = 64) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.reply = reply.encode()
        self.token_delay_s = token_delay_s
        self.max_waiting_requests = max_waiting_requests  # concurrent requests before 503
        self.fail_with: Exception | None = None  # raised by generate before any output
        self.fail_after_tokens: int | None = None  # engine dies mid-generation after this many
        self.started_ids: list[str] = []
        self.aborted_ids: list[str] = []
        self.sampling_params: dict[str, SamplingParams] = {}
        self.running: set[str] = set()
        self.is_started = False
        self._healthy = True
        self._stat_loggers: list[Callable[[IterationStats], None]] = []

    async def start(self) -> None:
        self.is_started = True

    async def shutdown(self) -> None:
        self.is_started = False

    @property
    def is_healthy(self) -> bool:
        return self._healthy

    def kill(self) -> None:
        self._healthy = False

    def add_stat_logger(self, callback: Callable[[IterationStats], None]) -> None:
        self._stat_loggers.append(callback)

    def get_stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_cache_usage": 0.25,
                "num_free_blocks": 6, "num_total_blocks": 8}

    async def abort(self, request_id: str) -> None:
        self.aborted_ids.append(request_id)

    def _next_token(self, step: int, params: SamplingParams) -> int:
        if step < len(self.reply):
            return self.reply[step]
        if params.ignore_eos:
            return self.reply[step % len(self.reply)]
        return self.tokenizer.eos_token_id

    async def generate(self, prompt: str | None, prompt_token_ids: list[int],
                       sampling_params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        if not self._healthy:
            raise EngineDeadError("fake engine is dead")
        if self.fail_with is not None:
            raise self.fail_with
        if len(self.running) >= self.max_waiting_requests:
            raise QueueFullError("fake queue is full")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError("prompt too long for the fake engine")
        self.started_ids.append(request_id)
        self.sampling_params[request_id] = sampling_params
        self.running.add(request_id)
        arrival, finished = time.monotonic(), False
        completion = CompletionOutput()
        try:
            for step in range(sampling_params.max_tokens or self.max_model_len):
                await asyncio.sleep(self.token_delay_s)
                if step == self.fail_after_tokens:
                    raise EngineDeadError("fake engine died mid-generation")
                token = self._next_token(step, sampling_params)
                reason = None
                if token == self.tokenizer.eos_token_id:
                    reason = "stop"
                elif step + 1 == sampling_params.max_tokens:
                    reason = "length"
                delta = self.tokenizer.decode([token])
                completion.delta_token_ids = [token]
                completion.delta_text = delta
                completion.token_ids = completion.token_ids + [token]
                completion.text += delta
                completion.finish_reason = reason
                finished = reason is not None
                self._log_step(len(prompt_token_ids) if step == 0 else 0, arrival, finished,
                               reason, len(prompt_token_ids), len(completion.token_ids))
                yield RequestOutput(request_id, prompt, prompt_token_ids,
                                    [CompletionOutput(**vars(completion))], finished=finished)
                if finished:
                    return
        finally:
            self.running.discard(request_id)
            if not finished:  # the consumer went away: what the real engine aborts on
                self.aborted_ids.append(request_id)

    def _log_step(self, num_prompt_tokens: int, arrival: float, finished: bool,
                  reason: str | None, prompt_len: int, output_len: int) -> None:
        elapsed = time.monotonic() - arrival
        stats = IterationStats(num_prompt_tokens=num_prompt_tokens, num_generation_tokens=1,
                               num_running=len(self.running), kv_cache_usage=0.25)
        if num_prompt_tokens:
            stats.ttfts_s.append(elapsed)
        else:
            stats.inter_token_latencies_s.append(self.token_delay_s)
        if finished:
            stats.finished.append(FinishedRequestStats(
                reason, prompt_len, output_len, e2e_latency_s=elapsed, queue_time_s=0.0,
                prefill_time_s=0.0, decode_time_s=elapsed,
                time_per_output_token_s=elapsed / output_len if output_len > 1 else None))
        for logger in self._stat_loggers:
            logger(stats)
