"""How one prompt is laid out over an SP group for prefill (algorithms.md §2.1, SP-NTP).

Rank i holds the contiguous chunk chunk_lens[i] of the sequence, in rank order (lengths may be
uneven, even 0). Ulysses splits heads by KV group: rank r owns a contiguous range of KV heads
and the G = Hq / Hkv query heads of each, so GQA works when P does not divide the head count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chunk_starts(chunk_lens: Sequence[int]) -> list[int]:
    """[P + 1] prefix sums: rank i's tokens are positions starts[i] .. starts[i + 1] - 1."""
    starts = [0]
    for n in chunk_lens:
        starts.append(starts[-1] + n)
    return starts


def kv_head_ranges(num_kv_heads: int, sp_size: int) -> list[range]:
    """Contiguous KV heads per rank, as even as possible, the larger shares first.

    With sp_size > num_kv_heads the last ranks get empty ranges (they own no heads but still
    take part in every all-to-all, with empty splits).
    """
    base, extra = divmod(num_kv_heads, sp_size)
    ranges, start = [], 0
    for r in range(sp_size):
        count = base + (1 if r < extra else 0)
        ranges.append(range(start, start + count))
        start += count
    return ranges


def query_head_range(kv_heads: range, group_size: int) -> range:
    """The query heads that share the KV heads kv_heads (GQA groups of group_size)."""
    return range(kv_heads.start * group_size, kv_heads.stop * group_size)


def check_local_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    chunk_lens: Sequence[int], rank: int, sp_size: int) -> int:
    """Validate one rank's q [n, Hq, D], k/v [n, Hkv, D] against the layout; returns G."""
    if len(chunk_lens) != sp_size or min(chunk_lens, default=0) < 0:
        raise ValueError(f"chunk_lens {list(chunk_lens)} must list {sp_size} lengths >= 0")
    n = chunk_lens[rank]
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"want q [n, Hq, D], k/v [n, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != n or k.shape[0] != n or q.shape[2] != k.shape[2]:
        raise ValueError(f"rank {rank}: q {tuple(q.shape)}, k {tuple(k.shape)} do not match "
                         f"chunk length {n}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of KV heads {k.shape[1]}")
    return q.shape[1] // k.shape[1]
