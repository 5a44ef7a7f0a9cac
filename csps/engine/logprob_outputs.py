"""Worker TokenLogprobs -> vLLM-shaped per-position logprob dicts, with each token's text."""

from __future__ import annotations

from collections.abc import Callable

from csps.contract.sampling import TokenLogprobs
from csps.engine.outputs import Logprob, PositionLogprobs


def position_logprobs(entry: TokenLogprobs,
                      decode: Callable[[int], str]) -> PositionLogprobs:
    """The chosen token first, then the top alternatives with their ranks (vLLM's order)."""
    out = {entry.token_id: Logprob(entry.logprob, entry.rank, decode(entry.token_id))}
    for rank, (token_id, logprob) in enumerate(entry.top, start=1):
        if token_id not in out:
            out[token_id] = Logprob(logprob, rank, decode(token_id))
    return out


def prompt_logprob_list(by_position: dict[int, PositionLogprobs],
                        num_prompt_tokens: int) -> list[PositionLogprobs | None]:
    """vLLM's prompt_logprobs: None for the first prompt token, then one dict per position
    (positions not yet computed are absent, so the list is complete once prefill is)."""
    return [None] + [by_position[p] for p in range(1, num_prompt_tokens) if p in by_position]
