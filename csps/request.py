"""Request state and sampling parameters, shared by the scheduler, engine and server. No torch.

A request counts tokens rather than storing a phase: `num_computed_tokens` grows as prefill chunks
and decode steps run, and `is_prefill` is derived from it (style.md example 2).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives a request may ask for, as vLLM's default
SAMPLING_EPS = 1e-5  # a temperature below this samples greedily (vLLM's _SAMPLING_EPS)
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


# OpenAI / vLLM `finish_reason` strings, by final status.
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's StructuredOutputsParams): a JSON schema (as a
    JSON string) or any JSON object. Exactly one is set."""

    json: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if (self.json is None) == (not self.json_object):
            raise ValueError("structured outputs take exactly one of a JSON schema "
                             "or json_object")


def _check_finite(name: str, value: float, low: float, high: float,
                  low_open: bool = False) -> None:
    """ValueError naming the parameter unless low <= value <= high (low < value if low_open).
    NaN fails every comparison, so finiteness is checked first."""
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {high}], "
                         f"got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """vLLM-compatible sampling parameters. temperature 0 means greedy.

    Penalties follow vLLM: presence and frequency penalties count the output tokens,
    the repetition penalty the prompt and output tokens; logit_bias adds to the raw logits;
    `logprobs` asks for the sampled token's log-probability and that many top alternatives,
    `prompt_logprobs` the same for every prompt token after the first."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k filtering
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens exist
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's and top-k
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        _check_finite("temperature", self.temperature, 0.0, 1e4)
        _check_finite("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_finite("min_p", self.min_p, 0.0, 1.0)
        _check_finite("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_finite("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_finite("repetition_penalty", self.repetition_penalty, 0.0, 1e4, low_open=True)
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None
                                   and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        for token_id, bias in (self.logit_bias or {}).items():
            if not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token_id!r}")
            _check_finite(f"logit_bias[{token_id}]", bias, -100.0, 100.0)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


@dataclass(eq=False)  # identity: the scheduler looks requests up in its queues
class Request:
    """One generation request as the scheduler sees it: token ids and counters only."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    max_tokens: int = 16  # resolved limit on output tokens (never None here)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens its last admission found in the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (decode asks for 1 token)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def is_prefill(self) -> bool:
        """True while known tokens (prompt, or outputs after a preemption) are uncomputed."""
        return self.num_computed_tokens < self.num_tokens - 1 or not self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
