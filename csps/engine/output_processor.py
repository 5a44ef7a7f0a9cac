"""Turns sampled token ids into vLLM-shaped RequestOutputs: incremental detokenization, stop
strings, per-request timestamps and per-iteration stats. No torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from csps.contract.sampling import TokenLogprobs
from csps.engine.logprob_outputs import position_logprobs, prompt_logprob_list
from csps.engine.outputs import (
    CompletionOutput,
    FinishedRequestStats,
    IterationStats,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from csps.request import SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: object  # IncrementalDetokenizer: .add(token_id) -> str, .flush() -> str
    metrics: RequestMetrics
    text: str = ""
    num_streamed: int = 0  # characters of `text` already handed out as deltas
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    decode: Callable[[int], str] = str  # one token id -> its text (logprob entries)
    index: int = 0  # which of the parent's n samples this is
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: dict[int, PositionLogprobs] = field(default_factory=dict)  # by position
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission

    def add_logprobs(self, entry: TokenLogprobs | None) -> None:
        if entry is not None:
            self.logprobs.append(position_logprobs(entry, self.decode))
            self.cumulative_logprob += entry.logprob

    def add_prompt_logprobs(self, entries: list[tuple[int, TokenLogprobs]]) -> None:
        """Positions seen again (a recompute after preemption) keep their first entry."""
        for position, entry in entries:
            if position < len(self.prompt_token_ids):
                self.prompt_logprobs.setdefault(position, position_logprobs(entry, self.decode))

    def append(self, token_id: int) -> str:
        """Add a token; return the text to stream now. The text is cut at a stop string when
        one completes; while stop strings are set, the last len(stop) - 1 characters are held
        back so that nothing streamed is later cut away."""
        old_len = len(self.text)
        self.token_ids.append(token_id)
        self.text += self.detokenizer.add(token_id)
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if at >= 0:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text = self.text[:end]
                self.finish_reason, self.stop_reason = "stop", stop
                break
        return self._take_delta(final=self.finish_reason is not None)

    def flush(self) -> str:
        """The stream is ending: append the detokenizer's held-back tail and return all text
        not yet streamed."""
        if self.stop_reason is None or isinstance(self.stop_reason, int):
            self.text += self.detokenizer.flush()
        return self._take_delta(final=True)

    def _take_delta(self, final: bool) -> str:
        hold = 0 if final or not self.params.stop else max(map(len, self.params.stop)) - 1
        end = max(self.num_streamed, len(self.text) - hold)
        delta, self.num_streamed = self.text[self.num_streamed:end], end
        return delta

    def to_output(self, delta_text: str, delta_token_ids: list[int],
                  error: str | None = None) -> RequestOutput:
        wants_logprobs = self.params.logprobs is not None
        completion = CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.token_ids),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            delta_text=delta_text, delta_token_ids=delta_token_ids,
            logprobs=list(self.logprobs) if wants_logprobs else None,
            cumulative_logprob=self.cumulative_logprob if wants_logprobs else None)
        prompt_logprobs = (prompt_logprob_list(self.prompt_logprobs, len(self.prompt_token_ids))
                           if self.params.prompt_logprobs is not None else None)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, outputs=[completion],
            finished=self.finish_reason is not None, metrics=self.metrics, error=error,
            prompt_logprobs=prompt_logprobs, num_cached_tokens=self.num_cached_tokens)


def finished_stats(state: RequestState) -> FinishedRequestStats:
    """Per-request latencies for the stat loggers, from the request's timestamps. A phase the
    request did not reach (an abort while waiting, a failure before the first token) is None,
    so that it does not enter that phase's histogram as a made-up zero."""
    m = state.metrics
    scheduled, first_token = m.first_scheduled_time, m.first_token_time
    finished = m.finished_time or m.last_token_time or first_token or scheduled or m.arrival_time
    num_generated = len(state.token_ids)
    started = scheduled or m.arrival_time
    tpot = None
    if first_token is not None and num_generated > 1:
        tpot = (finished - first_token) / (num_generated - 1)
    return FinishedRequestStats(
        finish_reason=state.finish_reason or "abort",
        num_prompt_tokens=len(state.prompt_token_ids),
        num_generation_tokens=num_generated,
        e2e_latency_s=finished - m.arrival_time,
        queue_time_s=None if scheduled is None else scheduled - m.arrival_time,
        prefill_time_s=None if first_token is None else first_token - started,
        decode_time_s=None if first_token is None else finished - first_token,
        time_per_output_token_s=tpot,
    )


def record_token_time(state: RequestState, now: float, stats: IterationStats) -> None:
    """Stamp a new token's arrival and add its TTFT or inter-token latency to `stats`."""
    m = state.metrics
    if m.first_token_time is None:
        m.first_token_time = now
        stats.ttfts_s.append(now - m.arrival_time)
    else:
        stats.inter_token_latencies_s.append(now - (m.last_token_time or now))
    m.last_token_time = now
