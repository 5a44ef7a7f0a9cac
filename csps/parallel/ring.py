"""SP-NTP attention by ring pass-KV (LoongServe-style prefill, algorithms.md §3 and §4).

Each rank keeps its queries; K/V blocks circulate around the SP group (P-1 hops). At every
step the next hop is started (isend/irecv) before the partial attention over the block in
hand, so the transfer overlaps the compute; the partial (out, lse) pairs are merged online
with merge_attn_states (§4). Causal with uneven chunks: the own block is attended with the
triangle, earlier ranks' blocks fully, later ranks' blocks (the future) are skipped but still
forwarded. Bytes per rank: one block per hop, (N - n_{r+1}) * 2 Hkv * D * e, the same as the
KV all-gather, and with the same causal imbalance (no zig-zag ordering).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from csps.attention.merge import merge_attn_states
from csps.attention.partial import partial_attention
from csps.parallel.comm import Communicator
from csps.parallel.sp_layout import check_local_qkv


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   chunk_lens: Sequence[int], comm: Communicator,
                   scale: float | None = None,
                   on_block: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                   return_lse: bool = False):
    """Causal attention of the whole sequence, returned for this rank's query rows.

    Same contract as ulysses_attention: q [n_r, Hq, D], k/v [n_r, Hkv, D] of this rank's
    chunk, chunk_lens [P] in rank order; collective over comm's group. Returns [n_r, Hq, D].
    on_block(src, k [n_src, Hkv, D], v) is called once for every chunk, the own one included,
    while it is in hand: every chunk passes every rank, so a rank can keep any of them
    (LoongServe's scale-down, attention/sp_prefill_plan.py). With return_lse also the
    log-sum-exp [n_r, Hq] fp32.
    """
    rank, sp_size = comm.rank, comm.size
    check_local_qkv(q, k, v, chunk_lens, rank, sp_size)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    block = torch.cat([k, v], dim=1)  # [n_src, 2 Hkv, D], src = (rank - step) % P
    out = lse = None  # running merge: [n_r, Hq, D] fp32, [n_r, Hq] fp32
    for step in range(sp_size):
        src = (rank - step) % sp_size
        pending = None
        if step < sp_size - 1:  # start the next hop first: it overlaps the compute below
            incoming = chunk_lens[(rank - step - 1) % sp_size]
            pending = comm.start_ring_shift(block, (incoming, 2 * num_kv_heads, head_dim))
        keys, values = block.split([num_kv_heads, num_kv_heads], dim=1)
        if on_block is not None and chunk_lens[src]:
            on_block(src, keys, values)
        if src <= rank and chunk_lens[src] and chunk_lens[rank]:
            # The own block (src == rank) shares positions with q: the causal triangle.
            part_out, part_lse = partial_attention(q, keys, values, scale=scale,
                                                   causal=src == rank)
            if out is None:
                out, lse = part_out.float(), part_lse
            else:
                out, lse = merge_attn_states([out, part_out], [lse, part_lse])
        if pending is not None:
            block = pending.wait()
    if out is None:  # this rank holds no queries
        out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
