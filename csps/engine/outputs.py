"""What the engine hands to its callers: vLLM-shaped request outputs and per-iteration stats.
No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    """vLLM's Logprob: one token's log-probability, its rank in the distribution (1 = most
    likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's logprobs: the chosen token and the top alternatives, by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One generated sequence (vLLM's `outputs[0]`). `text`/`token_ids` are cumulative; `delta_*`
    hold what this output adds to the previous one of the same request (for streaming)."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None  # one per token, when asked for
    cumulative_logprob: float | None = None


@dataclass
class RequestMetrics:
    """Timestamps of one request, seconds on `time.monotonic()`'s clock."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the request failed inside the engine
    # when asked for: None for the first prompt token, then one entry per prompt token
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int | None = None  # prompt tokens its KV took from the prefix cache


@dataclass
class FinishedRequestStats:
    """One finished request (any finish reason, aborts and errors included). A phase the
    request never reached (aborted while waiting, failed before its first token) is None."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency_s: float
    queue_time_s: float | None  # None: never scheduled
    prefill_time_s: float | None  # None: no first token
    decode_time_s: float | None  # None: no first token
    time_per_output_token_s: float | None  # None for fewer than two output tokens


@dataclass
class IterationStats:
    """Everything a stat logger (Prometheus) observes after one engine step."""

    num_prompt_tokens: int = 0  # prompt tokens computed this iteration
    num_generation_tokens: int = 0  # tokens sampled this iteration
    num_preempted_reqs: int = 0  # requests preempted this iteration (vLLM's name)
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0-1
    ttfts_s: list[float] = field(default_factory=list)  # for requests that got a first token
    inter_token_latencies_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    comm_bytes: dict[str, int] = field(default_factory=dict)  # phase -> bytes, all workers
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int = 0  # of them, tokens found cached
