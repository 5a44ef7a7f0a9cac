"""The prefix reuse a trace promises, from its hash ids alone: the fraction of prompt tokens whose
leading hash blocks an earlier request already sent. It is the hit rate of an unbounded prefix
cache (every block kept, whole blocks only), the ceiling a server's measured rate approaches.
No torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class HashedPrompt(Protocol):
    """A TraceRecord or a RequestSpec: a prompt length and its prefix block hashes."""

    input_len: int  # prompt tokens
    hash_ids: tuple[int, ...]  # one id per block of `block_tokens` tokens


def trace_reuse(records: Iterable[HashedPrompt], block_tokens: int) -> float:
    """Reused prompt tokens / all prompt tokens, in the order given (send order); 0 when empty.

    Per request, its leading blocks whose whole prefix an earlier request had (the run of
    hash ids from the start, stopping at the first new one), times `block_tokens`, capped at
    its `input_len`. A prefix cache hashes blocks chained from the start, so an id met after
    a different prefix is no hit. In a Mooncake trace ids are chained already (equal ids have
    equal prefixes), so this equals counting the leading ids seen before.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    # A trie of the prefixes sent so far: (parent node, hash id) -> node; node 0 is the root.
    children: dict[tuple[int, int], int] = {}
    reused = total = 0
    for record in records:
        node = num_seen = 0
        for hash_id in record.hash_ids:
            child = children.get((node, hash_id))
            if child is None:  # a new prefix: no later block of this request was seen either
                child = children[(node, hash_id)] = len(children) + 1
            else:
                num_seen += 1
            node = child
        reused += min(num_seen * block_tokens, record.input_len)
        total += record.input_len
    return reused / total if total else 0.0
