"""LLMEngine: the synchronous engine. Validates and admits requests; each `step()` starts the
scheduler's new steps on the free instances, waits until at least one step in flight finishes,
and books it (update -> detokenize), reporting vLLM-shaped outputs. Steps on disjoint instances
run at once (the executor keeps several in flight)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from csps.config import EngineConfig
from csps.contract.step import RunnerOutput, Step
from csps.contract.step_trace import StepTraceWriter
from csps.engine.errors import QueueFullError
from csps.engine.executor import Executor, make_executor
from csps.engine.output_processor import RequestState, finished_stats, record_token_time
from csps.engine.outputs import IterationStats, RequestMetrics, RequestOutput
from csps.engine.parent_request import ParentBook, child_params
from csps.engine.request_validation import validate_request
from csps.engine.worker_plan import plan_workers
from csps.model.loader import read_arch_config
from csps.model.resolve import resolve_model
from csps.model.tokenizer import IncrementalDetokenizer, Tokenizer
from csps.request import Request, RequestStatus, SamplingParams
from csps.scheduler.deployment import build_scheduler, places_kv_per_rank
from csps.scheduler.predictor import build_predictor

logger = logging.getLogger(__name__)

ExecutorFactory = Callable[[EngineConfig, dict[str, Any]], Executor]


class LLMEngine:
    def __init__(self, config: EngineConfig,
                 executor_factory: ExecutorFactory = make_executor) -> None:
        self.config = config
        model_dir = resolve_model(config.model.model)
        self.arch = read_arch_config(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self.model_name = config.model.name
        self.max_model_len = config.model.max_model_len or self.arch.max_position_embeddings
        worker_kwargs = plan_workers(config, self.arch, model_dir, self.max_model_len)
        num_blocks, dtype = worker_kwargs["num_blocks"], worker_kwargs["dtype"]
        self.executor = executor_factory(config, worker_kwargs)
        placed = places_kv_per_rank(config.scheduler.policy)
        predictor = build_predictor(config.scheduler.cost_model, model_dir, config.parallel,
                                    config.cache.block_size, dtype,
                                    config.scheduler.policy) if placed else None
        self.scheduler = build_scheduler(config, num_blocks, self.max_model_len, predictor)
        self._states: dict[str, RequestState] = {}
        self._parents = ParentBook()  # n > 1: child requests by parent
        trace = config.observability.step_trace
        self._trace = StepTraceWriter(trace) if trace else None  # --step-trace
        self._trace_origin = time.monotonic()
        # Set by AsyncLLMEngine: step() then also returns when a request arrives or is aborted,
        # so that instances the steps in flight leave idle start new work at once.
        self.wake = None

    # ---- admission --------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the model; return its resolved max_tokens. ValueError with a
        user-facing message if it cannot be served."""
        return validate_request(prompt_token_ids, params, self.arch.vocab_size,
                                self.max_model_len, self.scheduler)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Queue a request; n > 1 queues n child requests reported under `request_id`."""
        max_tokens = self.validate(prompt_token_ids, params)
        if self.scheduler.num_waiting + params.n > self.config.scheduler.max_waiting_requests:
            raise QueueFullError(f"The server is busy: {self.scheduler.num_waiting} requests "
                                 f"are waiting. Retry later.")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if params.n > 1:
            for index, child in enumerate(self._parents.add(request_id, params.n)):
                self._add(child, prompt, prompt_token_ids, child_params(params, index),
                          arrival, max_tokens, index)
        else:
            self._add(request_id, prompt, prompt_token_ids, params, arrival, max_tokens)

    def _add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
             params: SamplingParams, arrival: float, max_tokens: int, index: int = 0) -> None:
        request = Request(request_id, list(prompt_token_ids), params,
                          eos_token_id=self.tokenizer.eos_token_id, arrival_time=arrival,
                          max_tokens=max_tokens)
        self.scheduler.add_request(request)
        self._states[request_id] = RequestState(
            request_id, prompt, list(prompt_token_ids), params,
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids), RequestMetrics(arrival),
            decode=self._decode_token, index=index)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def abort_requests(self, request_ids: list[str],
                       stats: IterationStats | None = None) -> list[RequestOutput]:
        """Abort live requests (unknown or finished ids are ignored). With `stats`, each one
        is booked there as finished with reason "abort" for the stat loggers, as vLLM counts
        it in request_success_total."""
        outputs = []
        for request in self.scheduler.abort_requests(self._parents.child_ids(request_ids)):
            state = self._states.pop(request.request_id)
            state.finish_reason = "abort"
            self._book_finished(state, stats)
            outputs.append(state.to_output("", []))
        return self._parents.wrap(outputs)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the iteration ----------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], IterationStats]:
        now = time.monotonic()
        preemptions_before = self.scheduler.num_preemptions
        cache = self.scheduler.prefix_cache_stats
        queries_before, hits_before = cache.queries, cache.hits
        for step in self.scheduler.schedule_steps():
            for scheduled in step.scheduler_output.scheduled_requests:
                metrics = self._states[scheduled.request_id].metrics
                metrics.first_scheduled_time = metrics.first_scheduled_time or now
            self.executor.submit(step)
            if self._trace is not None:
                self._trace.started(step, time.monotonic() - self._trace_origin)
        stats = IterationStats()
        stats.num_preempted_reqs = self.scheduler.num_preemptions - preemptions_before
        stats.prefix_cache_queries = cache.queries - queries_before
        stats.prefix_cache_hits = cache.hits - hits_before
        outputs = []
        woken = {} if self.wake is None else {"wake": self.wake}
        for step, runner_output in self.executor.wait_steps(**woken):
            outputs += self._parents.wrap(self._book(step, runner_output, stats))
        return outputs, self._with_load(stats)

    def _with_load(self, stats: IterationStats) -> IterationStats:
        stats.num_running = self.scheduler.num_running
        stats.num_waiting = self.scheduler.num_waiting
        stats.kv_cache_usage = self.scheduler.kv_cache_manager.usage
        return stats

    def _book(self, step: Step, runner_output: RunnerOutput,
              stats: IterationStats) -> list[RequestOutput]:
        """A finished step: scheduler books, then detokenize and time each new token."""
        if self._trace is not None:
            self._trace.finished(step, time.monotonic() - self._trace_origin)
        updates = self.scheduler.update_from_step(step, runner_output)
        now = time.monotonic()
        stats.num_prompt_tokens += step.scheduler_output.num_prefill_tokens
        stats.num_generation_tokens += len(updates)
        for phase, num_bytes in runner_output.comm_bytes.items():
            stats.comm_bytes[phase] = stats.comm_bytes.get(phase, 0) + num_bytes
        outputs = [self._fail(request_id, message, stats)
                   for request_id, message in runner_output.failed.items()
                   if request_id in self._states]
        for request_id, entries in runner_output.prompt_logprobs.items():
            if request_id in self._states:
                self._states[request_id].add_prompt_logprobs(entries)
        for update in updates:
            request = update.request
            state = self._states.get(request.request_id)
            if state is None:
                continue
            state.num_cached_tokens = request.num_cached_tokens
            try:
                state.add_logprobs(runner_output.logprobs.get(request.request_id))
                delta = state.append(update.new_token_ids[0])
            except Exception as exc:  # noqa: BLE001 - a detokenizer or stop-check fault is its own
                outputs.append(self._fail(request.request_id,
                                          f"detokenizing failed: {type(exc).__name__}: {exc}",
                                          stats))
                continue
            record_token_time(state, now, stats)
            if update.finished and state.finish_reason is None:
                state.finish_reason = request.finish_reason
                state.stop_reason = update.stop_reason
                delta += state.flush()  # text held back mid-character ends the stream
            elif state.finish_reason is not None:  # a stop string ended it
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            if state.finish_reason is not None:
                state.metrics.finished_time = now
                stats.finished.append(finished_stats(state))
                del self._states[request.request_id]
            outputs.append(state.to_output(delta, list(update.new_token_ids)))
        return outputs

    def _fail(self, request_id: str, message: str,
              stats: IterationStats) -> RequestOutput:
        """Finish one request with an error (its own work failed); its KV is freed, the rest of
        the batch goes on."""
        logger.warning("request %s failed: %s", request_id, message)
        return self._finish_with_error(request_id, message, stats)

    def fail_all(self, message: str,
                 stats: IterationStats | None = None) -> list[RequestOutput]:
        """Finish every live request with an error (the executor died); with `stats`, each
        is booked there as finished with reason "error"."""
        return self._parents.wrap([self._finish_with_error(request_id, message, stats)
                                   for request_id in list(self._states)])

    def _finish_with_error(self, request_id: str, message: str,
                           stats: IterationStats | None) -> RequestOutput:
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
        state = self._states.pop(request_id)
        state.finish_reason = "error"
        self._book_finished(state, stats)
        return state.to_output("", [], error=message)

    def _book_finished(self, state: RequestState, stats: IterationStats | None) -> None:
        """A request finished by an abort or a failure: stamp it and book its
        FinishedRequestStats (and the engine's load after it) in `stats`, if given."""
        state.metrics.finished_time = time.monotonic()
        if stats is not None:
            stats.finished.append(finished_stats(state))
            self._with_load(stats)

    def get_stats(self) -> dict:
        manager = self.scheduler.kv_cache_manager
        return {"num_running": self.scheduler.num_running,
                "num_waiting": self.scheduler.num_waiting,
                "kv_cache_usage": manager.usage, "num_free_blocks": manager.num_free_blocks,
                "num_total_blocks": manager.num_total_blocks}

    def check_health(self) -> None:
        """Raise WorkerError if a worker has failed or exited (cheap: no round trip)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        if self._trace is not None:
            self._trace.close()
        self.executor.shutdown()
