"""Prompt token ids of a simulated request, shared exactly where its trace says prompts share.

The scheduler's prefix cache hashes full KV blocks of token ids, chained from position 0, so
the ids decide what the simulator reuses. Mooncake gives each request one hash id per block of
`block_tokens` prompt tokens (512 x the workload's length scale; the last block may be
partial), equal ids meaning equal text. Here the token at offset i of the block of hash id h is
h * block_tokens + i (non-negative), so requests whose hash ids agree on their first k ids
share exactly their first k * block_tokens tokens; every other token (past the hash ids, or of
a request without any: random workloads, Azure traces) is negative and depends on the
request's index, so nothing else is shared. Ids stay within a signed 32-bit int. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from csps.bench.traces import MOONCAKE_BLOCK_TOKENS

TOKEN_ID_RANGE = 2**31 - 1  # ids lie in (-TOKEN_ID_RANGE, TOKEN_ID_RANGE); a prime
_UNIQUE_STRIDE = 65537  # per request index; prime to TOKEN_ID_RANGE, so indexes never collide


def hash_block_tokens(length_scale: float = 1.0) -> int:
    """Prompt tokens per Mooncake hash id once the trace's lengths are scaled (at least 1),
    rounded as csps/bench/traces.py scale_records rounds lengths."""
    if not length_scale > 0:
        raise ValueError(f"length_scale must be > 0, got {length_scale}")
    return max(1, round(MOONCAKE_BLOCK_TOKENS * length_scale))


def prompt_token_ids(index: int, input_len: int, hash_ids: Sequence[int] = (),
                     block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> list[int]:
    """The `input_len` prompt ids of the workload's request number `index` (module docstring).

    NOTE: a hashed id wraps modulo TOKEN_ID_RANGE (two hash ids could then meet only past
    ~4M ids of 512 tokens; Mooncake's conversation trace has 183k). A unique id at position p
    is -1 - (index * 65537 + p) mod TOKEN_ID_RANGE: two requests' ids at the same position
    differ whenever their indexes differ (mod TOKEN_ID_RANGE), so their chains split there.
    """
    if index < 0 or input_len < 0:
        raise ValueError(f"index and input_len must be >= 0, got {index}, {input_len}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    ids: list[int] = []
    for hash_id in hash_ids:
        if len(ids) >= input_len:
            break
        start = hash_id * block_tokens
        count = min(block_tokens, input_len - len(ids))
        ids.extend((start + offset) % TOKEN_ID_RANGE for offset in range(count))
    base = index * _UNIQUE_STRIDE
    ids.extend(-1 - (base + position) % TOKEN_ID_RANGE
               for position in range(len(ids), input_len))
    return ids
