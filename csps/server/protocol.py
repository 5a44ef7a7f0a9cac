"""OpenAI-compatible request and response schemas (pydantic v2), as vLLM's server speaks them.

Requests name every sampling field csps honours; fields csps knows but does not implement are
declared too, so `unsupported_parameter()` can reject them by name instead of ignoring them.
Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from csps.request import SamplingParams, StructuredOutputsParams
from csps.server.response_format import response_format_to_structured_outputs

MAX_N = 128  # OpenAI's limit on `n`; each sample is a request in the engine's queue
INT64 = (-(2**63), 2**63 - 1)  # torch.Generator.manual_seed's range (vLLM bounds seed so)
# The sampler works in fp32: far below this, logits / temperature and logits /
# repetition_penalty overflow to inf (softmax gives NaN) and top_p rounds to 0 (no token kept).
# Smaller positive values are raised to it, which samples the same in effect: the top token
# (temperature, top_p), or the seen tokens boosted past all others (repetition_penalty).
MIN_POSITIVE = 1e-6


def _at_least_min_positive(value: float | None) -> float | None:
    return MIN_POSITIVE if value is not None and 0 < value < MIN_POSITIVE else value


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None  # None: 1.0
    top_k: int | None = None  # None, 0 or -1: disabled
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    n: int = Field(default=1, le=MAX_N)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None  # None: 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    # Known but not implemented: each must keep one of the listed values.
    allowed_values: ClassVar[dict[str, tuple]] = {}
    # a SamplingParams field named in a ValueError -> the request field the user set
    param_names: ClassVar[dict[str, str]] = {}

    def unsupported_parameter(self) -> tuple[str, Any] | None:
        """The first known-but-unimplemented parameter set to a value csps cannot honour."""
        for name, allowed in self.allowed_values.items():
            value = getattr(self, name)
            if value not in allowed:
                return name, value
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def logprob_params(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) as SamplingParams counts them."""
        return None, None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        return None

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Raises ValueError (from SamplingParams) on out-of-range values."""
        logprobs, prompt_logprobs = self.logprob_params()
        floor = _at_least_min_positive
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else floor(self.temperature),
            top_p=1.0 if self.top_p is None else floor(self.top_p),
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=(1.0 if self.repetition_penalty is None
                                else floor(self.repetition_penalty)),
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop or (),
            stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=_token_bias(self.logit_bias),
            structured_outputs=self.structured_outputs(),
        )


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's {"50256": -100} -> {50256: -100.0}; a key that is no token id raises."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
    return out


class CompletionRequest(SamplingRequest):
    # one text, several texts, one token-id list, or several token-id lists
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    best_of: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    allowed_values: ClassVar[dict[str, tuple]] = {"best_of": (None, 1), "suffix": (None, "")}

    def logprob_params(self) -> tuple[int | None, int | None]:
        """echo with logprobs scores the prompt too (lm-evaluation-harness's loglikelihood)."""
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = self.logprobs
        return self.logprobs, prompt_logprobs


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    allowed_values: ClassVar[dict[str, tuple]] = {"tools": (None, [])}
    param_names: ClassVar[dict[str, str]] = {"logprobs": "top_logprobs"}

    def logprob_params(self) -> tuple[int | None, int | None]:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        return response_format_to_structured_outputs(self.response_format)

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None  # exactly one of prompt and messages
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`
    add_generation_prompt: bool = True  # for `messages`


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
