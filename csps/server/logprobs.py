"""Logprobs in the OpenAI shapes: the completions API's parallel lists (tokens, token_logprobs,
top_logprobs, text_offset) and the chat API's `content` list of token entries, built from the
engine's per-position dicts (chosen token first, then the top alternatives by rank).

JSON has no -inf: a log-probability of -inf is sent as -9999.0, as vLLM does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel

from csps.engine.outputs import PositionLogprobs

NEG_INF_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NEG_INF_LOGPROB


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


def _token_text(entry: PositionLogprobs, token_id: int) -> str:
    text = entry[token_id].decoded_token
    return text if text is not None else ""


def _by_rank(entry: PositionLogprobs, num_top: int) -> list[tuple[int, float, str]]:
    ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
    return [(t, lp.logprob, lp.decoded_token or "") for t, lp in ranked[:num_top]]


def completion_logprobs(token_ids: list[int], entries: list[PositionLogprobs | None],
                        num_top: int, decode: Callable[[int], str],
                        text_offset: int = 0) -> CompletionLogprobs:
    """One position per token id; an entry of None (the first prompt token under echo) has no
    logprob. `text_offset` is where the first token's text starts in the choice's text."""
    out = CompletionLogprobs()
    offset = text_offset
    for token_id, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            out.tokens.append(decode(token_id))
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            token = _token_text(entry, token_id)
            out.tokens.append(token)
            out.token_logprobs.append(_finite(entry[token_id].logprob))
            top = {text: _finite(lp) for _, lp, text in _by_rank(entry, num_top)}
            out.top_logprobs.append({token: _finite(entry[token_id].logprob)} | top)
        out.text_offset.append(offset)
        offset += len(out.tokens[-1])
    return out


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs],
                  num_top: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        token = _token_text(entry, token_id)
        top = [ChatTopLogprob(token=text, logprob=_finite(lp), bytes=list(text.encode()))
               for _, lp, text in _by_rank(entry, num_top)]
        content.append(ChatLogprobToken(token=token, logprob=_finite(entry[token_id].logprob),
                                        bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)
