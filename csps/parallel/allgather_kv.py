"""SP-NTP attention, "partial Q, all-gathered KV" layout (algorithms.md §2.1, [ours]).

Each rank keeps its chunk's queries with all heads, all-gathers K and V of the whole sequence
(one message of [n_i, 2 Hkv, D] per rank) and attends its rows with the causal offset of its
chunk. Bytes sent per rank per layer: (P-1) * n_r * 2 Hkv * D * e, independent of Hq, so with
few KV heads it sends fewer bytes than Ulysses (P * Hkv / (Hq + Hkv) times as many; see
ulysses.py). The price is causal imbalance: rank r attends n_r * (start_r + n_r / 2) pairs, so
with even chunks the last rank does (2P-1)/P^2 of all the work (3/4 at P=2, 5/9 at P=3).
Ulysses stays the default; this layout wins when P is far above Hkv (ulysses.py gives the
rule) or when bytes, not attention FLOPs, bound a step (short prompts, slow links).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from csps.attention.merge import merge_attn_states
from csps.attention.partial import partial_attention
from csps.parallel.comm import Communicator
from csps.parallel.sp_layout import check_local_qkv, chunk_starts


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           chunk_lens: Sequence[int], comm: Communicator,
                           scale: float | None = None, return_lse: bool = False):
    """Causal attention of the whole sequence, returned for this rank's query rows.

    Same contract as ulysses_attention: q [n_r, Hq, D], k/v [n_r, Hkv, D] of this rank's
    chunk, chunk_lens [P] in rank order; collective over comm's group. Returns [n_r, Hq, D]
    (with return_lse also its log-sum-exp [n_r, Hq] fp32).
    """
    rank = comm.rank
    check_local_qkv(q, k, v, chunk_lens, rank, comm.size)
    num_kv_heads = k.shape[1]
    kv = comm.all_gather(torch.cat([k, v], dim=1), chunk_lens)  # [N, 2 Hkv, D]
    start = chunk_starts(chunk_lens)[rank]
    n_r = chunk_lens[rank]
    if n_r == 0:
        empty = q.new_empty(q.shape)
        return (empty, q.new_empty(q.shape[:2], dtype=torch.float32)) if return_lse else empty
    # Keys after this chunk's last query are never seen: cut them before attending.
    keys, values = kv[:start + n_r].split([num_kv_heads, num_kv_heads], dim=1)
    out, lse = _offset_causal_attention(q, keys, values, start, scale)
    return (out, lse) if return_lse else out


def _offset_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
                             scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hq, D] at positions offset..offset+n-1; k/v [offset + n, Hkv, D] -> (out
    [n, Hq, D], lse [n, Hq] fp32)."""
    # NOTE: one SDPA call with a shifted-triangle mask would compute every masked tile (CPU
    # SDPA aligns is_causal top-left); instead: the earlier keys unmasked, the own block
    # causal, merged by log-sum-exp.
    own_out, own_lse = partial_attention(q, k[offset:], v[offset:], scale=scale, causal=True)
    if offset == 0:
        return own_out, own_lse
    early_out, early_lse = partial_attention(q, k[:offset], v[:offset], scale=scale)
    return merge_attn_states([early_out, own_out], [early_lse, own_lse])
