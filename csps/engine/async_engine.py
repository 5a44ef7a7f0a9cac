"""AsyncLLMEngine: runs LLMEngine.step() in a background thread and streams each request's
outputs to an asyncio consumer. Adds and aborts cross into the engine thread through one queue,
so only that thread touches the scheduler. A consumer that stops listening aborts its request."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from csps.config import EngineConfig
from csps.engine.errors import EngineDeadError, QueueFullError
from csps.engine.llm_engine import LLMEngine
from csps.engine.outputs import IterationStats, RequestOutput
from csps.engine.wakeup import Wakeup
from csps.request import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._wakeup = Wakeup()  # a command wakes the loop even while steps are in flight
        engine.wake = self._wakeup
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stat_loggers: list[Callable[[IterationStats], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead_reason: str | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop died or a worker is found dead (checked without a step,
        so /health turns 503 even while idle)."""
        if self.dead_reason is None:
            try:
                self.engine.check_health()
            except EngineDeadError as exc:
                self.dead_reason = f"{type(exc).__name__}: {exc}"
        return self.dead_reason is None and (self._thread is None or self._thread.is_alive())

    def add_stat_logger(self, callback: Callable[[IterationStats], None]) -> None:
        self._stat_loggers.append(callback)

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="csps-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._command("wake", None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.engine.shutdown()
        self._wakeup.close()

    # ---- caller side ------------------------------------------------------------------------
    async def generate(self, prompt: str | None, prompt_token_ids: list[int],
                       sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if not self.is_healthy:
            raise EngineDeadError(f"The engine is not running: {self.dead_reason}")
        self.engine.validate(prompt_token_ids, sampling_params)
        if self.engine.scheduler.num_waiting + self._commands.qsize() + sampling_params.n > \
                self.engine.config.scheduler.max_waiting_requests:  # n samples, n requests
            raise QueueFullError("The server is busy: the waiting queue is full. Retry later.")
        if self._thread is None:
            await self.start()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._command("add", (request_id, prompt, prompt_token_ids, sampling_params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._command("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._command("abort", request_id)

    def _command(self, kind: str, payload) -> None:
        self._commands.put((kind, payload))
        self._wakeup.set()

    # ---- engine thread ----------------------------------------------------------------------
    def _publish(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _apply(self, kind: str, payload) -> None:
        if kind == "add":
            request_id = payload[0]
            try:
                self.engine.add_request(*payload)
            except Exception as exc:  # validation or a full queue: the caller sees it
                self._publish(request_id, exc)
        elif kind == "abort":  # a client went away (or asked): count it as vLLM does
            stats = IterationStats()
            if self.engine.abort_requests([payload], stats):
                self._log_stats(stats)

    def _log_stats(self, stats: IterationStats) -> None:
        for callback in self._stat_loggers:
            callback(stats)

    def _run(self) -> None:
        try:
            while not self._stopping:
                block = not self.engine.has_unfinished_requests()
                self._wakeup.clear()  # a command queued after this wakes the next step()
                try:
                    while True:
                        self._apply(*self._commands.get(block=block, timeout=None))
                        block = False
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished_requests():
                    continue
                outputs, stats = self.engine.step()
                for output in outputs:
                    self._publish(output.request_id, output)
                self._log_stats(stats)
        except Exception as exc:  # the executor or a worker failed: fail loudly, never hang
            logger.exception("engine loop died")
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            stats = IterationStats()
            for output in self.engine.fail_all(f"The engine failed: {self.dead_reason}", stats):
                self._publish(output.request_id, output)
            for request_id in list(self._streams):
                self._publish(request_id, EngineDeadError(self.dead_reason))
            try:  # the failed requests count as "error" in request_success_total
                self._log_stats(stats)
            except Exception:  # noqa: BLE001 - the engine is already dead; keep its reason
                logger.exception("stat logging after the engine died failed")
