"""SP-NTP attention, DeepSpeed-Ulysses layout (algorithms.md §2.1): sequence <-> head all-to-all.

One all-to-all turns "my chunk, all heads" into "all tokens, my heads" (q, k, v packed into
one message), each rank runs causal attention over the whole sequence for its heads, and a
reverse all-to-all brings the outputs of its chunk back. Heads are split by KV group
(sp_layout.kv_head_ranges), so 9 query / 3 KV heads work for any P; ranks beyond Hkv idle.

Bytes per rank per layer (n_r its chunk, hq_j / hkv_j rank j's heads, e bytes per element):
forward n_r * sum_{j != r}(hq_j + 2 hkv_j) * D * e, reverse hq_r * (N - n_r) * D * e; about
2 (P-1)/P * (N/P) * (Hq + Hkv) * D * e. The all-gathered-KV layout (allgather_kv.py) sends
P * Hkv / (Hq + Hkv) times that: for 9/3 heads P/4, so fewer bytes at P = 2, 3 (measured at
N=4096, D=64, fp32: P=2 5.8/6.8 MB vs 3.1 MB; P=3 5.6 MB vs 4.2 MB). Ulysses is still the
default for GQA prefill: attention is quadratic and dominates long prompts, and its busiest
rank does ceil(Hkv/P)/Hkv of the work (2/3 at P=2, 1/3 at P=3) against (2P-1)/P^2 for the
last rank of the KV layouts (3/4, 5/9). Switch to all-gathered KV only when P is so far above
Hkv that (2P-1)/P^2 < ceil(Hkv/P)/Hkv (Hkv=3: P >= 6) or when bytes, not FLOPs, bound a step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from csps.attention.partial import partial_attention
from csps.parallel.comm import Communicator
from csps.parallel.sp_layout import check_local_qkv, kv_head_ranges, query_head_range


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      chunk_lens: Sequence[int], comm: Communicator,
                      scale: float | None = None, return_lse: bool = False):
    """Causal attention of the whole sequence, returned for this rank's query rows.

    q [n_r, Hq, D], k/v [n_r, Hkv, D]: this rank's chunk (RoPE at global positions); chunk_lens
    [P] in rank (= sequence) order on comm's group. Collective: every rank of the group calls
    it with the same chunk_lens and head counts. Returns [n_r, Hq, D] in q's dtype, and with
    return_lse also the log-sum-exp [n_r, Hq] fp32 (a second, small reverse all-to-all): what
    a chunked SP prefill merges with its prefix's part (sp_prefix.py).
    """
    rank, sp_size = comm.rank, comm.size
    group_size = check_local_qkv(q, k, v, chunk_lens, rank, sp_size)
    num_tokens, head_dim = sum(chunk_lens), q.shape[2]
    kv_ranges = kv_head_ranges(k.shape[1], sp_size)
    q_ranges = [query_head_range(kv, group_size) for kv in kv_ranges]

    # Forward: to rank j, my chunk's q, k, v for j's heads: [n_r, hq_j + 2 hkv_j, D].
    sends = [torch.cat([q[:, qh.start:qh.stop], k[:, kv.start:kv.stop],
                        v[:, kv.start:kv.stop]], dim=1)
             for qh, kv in zip(q_ranges, kv_ranges, strict=True)]
    my_q, my_kv = len(q_ranges[rank]), len(kv_ranges[rank])
    width = my_q + 2 * my_kv
    parts = comm.all_to_all(sends, [(n, width, head_dim) for n in chunk_lens])
    qkv = torch.cat(parts)  # [N, hq_r + 2 hkv_r, D], sequence order
    full_q, full_k, full_v = qkv.split([my_q, my_kv, my_kv], dim=1)

    out = qkv.new_empty(my_q, num_tokens, head_dim)  # [hq_r, N, D], head-major
    lse = qkv.new_full((my_q, num_tokens), float("-inf"), dtype=torch.float32)  # [hq_r, N]
    if my_q and num_tokens:
        if return_lse:
            out, lse = partial_attention(full_q, full_k, full_v, scale=scale, causal=True)
            out, lse = out.transpose(0, 1), lse.transpose(0, 1).contiguous()
        else:
            out = _causal_attention(full_q, full_k, full_v, scale)

    # Reverse: to rank j, j's rows of my heads [hq_r, n_j, D]; back come [hq_j, n_r, D].
    n_r = chunk_lens[rank]
    parts = comm.all_to_all(list(out.split(list(chunk_lens), dim=1)),
                            [(len(qh), n_r, head_dim) for qh in q_ranges])
    result = torch.cat(parts).transpose(0, 1).contiguous().to(q.dtype)  # [n_r, Hq, D]
    if not return_lse:
        return result
    parts = comm.all_to_all(list(lse.split(list(chunk_lens), dim=1)),
                            [(len(qh), n_r) for qh in q_ranges])
    return result, torch.cat(parts).transpose(0, 1).contiguous()  # [n_r, Hq] fp32


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """q [N, h, D], k/v [N, hkv, D], positions 0..N-1 -> out [h, N, D] (head-major)."""
    # NOTE: SDPA wants [batch, heads, L, D]; without the batch dim CPU SDPA takes its
    # O(L^2)-memory math path instead of the flash kernel.
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out[0]
