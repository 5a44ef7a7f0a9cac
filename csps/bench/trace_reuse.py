"""The prefix reuse a trace promises, from its hash ids alone (no cache, no timing): what a prefix
cache large enough, and filled before each request arrives, would hit. The ceiling a server's
(or the simulator's) measured hit rate approaches. No torch.

Per request in arrival order, its leading hash ids whose whole prefix an earlier request's
prompt began with (a prefix tree of every earlier request's ids: a cache hashes blocks chained
from the start, so an id met after a different prefix is no hit), times the tokens per hash id,
capped at its prompt length; summed over requests and divided by their prompt tokens. With
`kv_block_size` the figure is what csps' cache can hit of that: whole KV blocks only, never the
prompt's last token (recomputed to sample from); per request it is what that request's
`cached_tokens` should be.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from csps.bench.traces import MOONCAKE_BLOCK_TOKENS


class HashedPrompt(Protocol):
    """A TraceRecord or a RequestSpec: a prompt length and its prefix block hashes."""

    input_len: int  # prompt tokens
    hash_ids: tuple[int, ...]  # one id per block of `block_tokens` tokens


@dataclass(frozen=True, slots=True)
class TraceReuse:
    reused_tokens: int  # prompt tokens an earlier prompt already had, summed over requests
    input_tokens: int  # prompt tokens, summed over requests
    num_requests: int
    num_requests_reusing: int  # requests with at least one reused token
    reused_per_request: tuple[int, ...] = ()  # reused tokens of each request, in order

    @property
    def reuse_rate(self) -> float:
        """reused / input tokens (0 for an empty workload)."""
        return self.reused_tokens / self.input_tokens if self.input_tokens else 0.0


def reuse_of(requests: Iterable[tuple[int, Sequence[int]]],
             block_tokens: int = MOONCAKE_BLOCK_TOKENS,
             kv_block_size: int | None = None) -> TraceReuse:
    """`requests`: (input_len, hash_ids) in arrival order; `block_tokens`: prompt tokens per
    hash id; `kv_block_size`: count whole KV blocks of at most input_len - 1 tokens only."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    if kv_block_size is not None and kv_block_size < 1:
        raise ValueError(f"kv_block_size must be >= 1, got {kv_block_size}")
    root: dict = {}  # hash id -> subtree: every earlier prompt's ids, by position
    reused = total = count = reusing = 0
    per_request: list[int] = []
    for input_len, hash_ids in requests:
        node, matched, is_matching = root, 0, True
        for hash_id in hash_ids:
            child = node.get(hash_id) if is_matching else None
            if child is None:  # a new prefix: no later block of this request was seen either
                is_matching = False
                child = node[hash_id] = {}
            else:
                matched += 1
            node = child
        tokens = min(matched * block_tokens, input_len)
        if kv_block_size is not None:
            tokens = min(tokens, input_len - 1) // kv_block_size * kv_block_size
        tokens = max(tokens, 0)
        reused, total, count = reused + tokens, total + input_len, count + 1
        reusing += tokens > 0
        per_request.append(tokens)
    return TraceReuse(reused, total, count, reusing, tuple(per_request))


def trace_reuse(records: Iterable[HashedPrompt], block_tokens: int) -> float:
    """Reused prompt tokens / all prompt tokens of records in send order; 0 when empty."""
    return reuse_of(((r.input_len, r.hash_ids) for r in records), block_tokens).reuse_rate
