"""Attention of a chunked SP prefill's slice to the prompt's earlier slices (issue 12).

A long prompt prefilled in slices leaves each earlier slice's K/V where it was computed: every
rank of the group holds its chunks of them. A later slice attends to that prefix in place, by
moving the queries, not the KV (as q-move decode does, algorithms.md §2.4): the slice's queries
are all-gathered over the group, every rank attends all of them to the prefix K/V it holds (no
mask: the whole prefix precedes the slice) and returns each rank its rows' partial (out, lse),
which the owner merges with the slice's own causal attention (merge.py). Exact: the parts cover
disjoint key sets. Bytes per rank per layer: (P-1) * n_r * Hq * D * e out (queries) and
(P-1) * n_r * Hq * (D + 1) * 4 back (fp32 parts), independent of the prefix's length, where
moving the prefix's KV would cost (P-1)/P * prefix * 2 Hkv * D * e.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from csps.attention.merge import merge_attn_states
from csps.attention.partial import partial_attention
from csps.parallel.comm import Communicator


def prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                     chunk_lens: Sequence[int], comm: Communicator,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice rows attended to the whole group's prefix.

    q [n_r, Hq, D]: this rank's chunk of the slice (chunk_lens [P] in rank order on comm's
    group); prefix_k/v [m, Hkv, D]: the prefix K/V this rank holds (any order, m may be 0).
    Collective over comm's group. Returns (out [n_r, Hq, D] fp32, lse [n_r, Hq] fp32); lse is
    -inf for rows that no rank had prefix keys for.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    all_q = comm.all_gather(q, list(chunk_lens))  # [N, Hq, D], the slice in sequence order
    num_tokens = all_q.shape[0]
    if prefix_k.shape[0] and num_tokens:
        out, lse = partial_attention(all_q, prefix_k, prefix_v, scale=scale)
    else:  # nothing held here: a part that saw no key
        out = all_q.new_zeros(all_q.shape, dtype=torch.float32)
        lse = all_q.new_full((num_tokens, num_heads), float("-inf"), dtype=torch.float32)
    packed = torch.cat([out.float(), lse[..., None]], dim=-1)  # [N, Hq, D + 1] fp32
    n_r = chunk_lens[comm.rank]
    parts = comm.all_to_all(list(packed.split(list(chunk_lens))),
                            [(n_r, num_heads, head_dim + 1)] * comm.size)
    return merge_attn_states([p[..., :head_dim] for p in parts],
                             [p[..., head_dim] for p in parts])
