"""CSA, Communication-efficient Sparse Attention for SP prefill (algorithms.md §2.2).

"Nearby tokens attended densely, far tokens through a strided sample". Levels (CsaConfig):
level 0 is the rank's own chunk, dense causal, no communication. Level l >= 1 covers the ranks
of r's level-l group (r // g_l) that are not in its level-(l-1) group and come before r in the
sequence: with nested contiguous groups, ranks lo_l .. lo_{l-1} - 1 (lo_l = r // g_l * g_l).
Later ranks are the future; the level sets are disjoint and the top level (g = P) makes them
cover every earlier rank, so no key is counted twice. At level l, KV head h (and the query
heads of its GQA group) keeps the keys at global positions i with i % s_l == h % s_l, and
position 0 (the attention sink) for every head. The
levels' partial (out, lse) are merged exactly (merge.py). With every stride 1 this is dense
causal attention.

far_queries "all" [ours]: each key holder sends its sampled K/V to the later ranks of the
level (one all-to-all per level) and every local query attends them on its own rank. Bytes for
a (holder j, querier r) pair: n_j / s * 2 Hkv * D * e. Far compute lands on the later ranks
(causal imbalance, like allgather_kv.py). Micro-batch pipelining (§2.3): csa_pipeline.py.
far_queries "sampled" [proto]: queries travel, keys stay. For KV head h, the querier sends
only its query rows at positions i % s_l == h % s_l (G heads each); the holder attends them to
its own sampled K/V and sends back out with lse (two all-to-alls per level). Bytes per pair:
n_r / s * Hq * (2 D + 4 / e) * e, so with GQA (Hq > Hkv) MORE bytes than "all" (9/3 heads:
about 3x); what it buys is far compute on the key holders (the earlier, less loaded ranks).
Accuracy: a query row that is not sampled for head h gets no far-level context for that head at
all, only its nearer levels (as in the prototype): per head only 1/s_l of the rows see level l.
Measured, P=4, N=4096 even, 9/3 heads, D=64, fp32, all ranks' bytes: stride 1 "all" 9.4 MB
(only earlier ranks' K/V travel: half of allgather_kv's 18.9), "sampled" 28.5 MB; with
"1:1,2:4,4:8" 1.57 MB and 4.76 MB (1/6 of stride 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from csps.attention.merge import merge_attn_states
from csps.attention.partial import partial_attention
from csps.contract.csa_config import CsaConfig
from csps.parallel.comm import Communicator
from csps.parallel.sp_layout import check_local_qkv, chunk_starts


def csa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  chunk_lens: Sequence[int], comm: Communicator, scale: float | None = None,
                  *, config: CsaConfig, return_lse: bool = False):
    """Sparse causal attention of the whole sequence, returned for this rank's query rows.

    Same contract as ulysses_attention: q [n_r, Hq, D], k/v [n_r, Hkv, D] of this rank's
    chunk, chunk_lens [P] in rank order; collective over comm's group (every rank makes the
    same all-to-alls, empty where it has nothing to send). Returns [n_r, Hq, D] (with
    return_lse also its log-sum-exp [n_r, Hq] fp32).
    """
    rank, size = comm.rank, comm.size
    check_local_qkv(q, k, v, chunk_lens, rank, size)
    config.check_sp_size(size)
    starts = chunk_starts(chunk_lens)
    n_r = chunk_lens[rank]
    outs, lses = [], []
    if n_r:
        out, lse = partial_attention(q, k, v, scale=scale, causal=True)
        outs.append(out.float())
        lses.append(lse)
    travel = _keys_travel if config.far_queries == "all" else _queries_travel
    levels = [_Level([_far_ranks(r, config.levels[i - 1][0], group) for r in range(size)],
                     stride, starts) for i, (group, stride) in enumerate(config.levels) if i]
    if config.pipelined:  # micro-batches, comm overlapping compute (csa_pipeline.py)
        from csps.parallel.csa_pipeline import far_levels  # NOTE: it imports this module
        parts = [far_levels(q, k, v, levels, comm, scale, config)]
    else:
        parts = [travel(q, k, v, lv, comm, scale) for lv in levels]
    for part in parts:
        if part is not None and n_r:
            outs.append(part[0])
            lses.append(part[1])
    if not n_r:
        empty = q.new_empty(q.shape)
        return (empty, q.new_empty(q.shape[:2], dtype=torch.float32)) if return_lse else empty
    out, lse = merge_attn_states(outs, lses)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def _far_ranks(rank: int, inner: int, outer: int) -> range:
    """Ranks of rank's outer group before its inner group: the keys level (inner, outer) sees."""
    return range(rank // outer * outer, rank // inner * inner)


class _Level:
    """One level's geometry: far[r] (key-holding ranks r sees), stride, chunk starts."""

    def __init__(self, far: list[range], stride: int, starts: list[int]) -> None:
        self.far, self.stride, self.starts = far, stride, starts

    def rows(self, rank: int, head: int) -> list[int]:
        """Local rows of rank's chunk kept by KV head `head`: global i % stride == head % stride,
        plus position 0 for every head (the attention sink trained models park spare attention
        on; without it most heads lose it at every far level: +11-14% NLL at 1:1,2:4)."""
        start, stop = self.starts[rank], self.starts[rank + 1]
        rows = list(range((head - start) % self.stride, stop - start, self.stride))
        if start == 0 < stop and (not rows or rows[0] != 0):
            rows.insert(0, 0)
        return rows

    def counts(self, rank: int, num_kv_heads: int) -> list[int]:
        return [len(self.rows(rank, h)) for h in range(num_kv_heads)]

    def index(self, rank: int, head: int, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.rows(rank, head), dtype=torch.int64, device=device)


def _keys_travel(q, k, v, lv: _Level, comm: Communicator, scale):
    """far_queries "all": sampled K/V to the later ranks; all local queries attend them."""
    rank, size = comm.rank, comm.size
    num_kv, dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv
    kv_idx = [lv.index(rank, h, k.device) for h in range(num_kv)]
    mine = torch.cat([torch.stack([k[idx, h], v[idx, h]]).reshape(-1)  # per head [2, c_h, D]
                      for h, idx in enumerate(kv_idx)])
    empty = k.new_empty(0)
    sends = [mine if rank in lv.far[dst] else empty for dst in range(size)]
    shapes = [(2 * sum(lv.counts(src, num_kv)) * dim if src in lv.far[rank] else 0,)
              for src in range(size)]
    recv = comm.all_to_all(sends, shapes)
    if not len(lv.far[rank]) or not q.shape[0]:
        return None
    per_head = [[] for _ in range(num_kv)]  # h -> [2, c, D] blocks from each far rank
    for src in lv.far[rank]:
        counts = lv.counts(src, num_kv)
        for h, (block, c) in enumerate(zip(recv[src].split([2 * c * dim for c in counts]),
                                           counts, strict=True)):
            per_head[h].append(block.view(2, c, dim))
    outs, lses = [], []
    for h, blocks in enumerate(per_head):
        kv = torch.cat(blocks, dim=1)  # [2, C_h, D]
        out, lse = _attend(q[:, h * group:(h + 1) * group], kv[0], kv[1], scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)  # [n_r, Hq, D] fp32, [n_r, Hq]


def _queries_travel(q, k, v, lv: _Level, comm: Communicator, scale):
    """far_queries "sampled": sampled query rows go to the holders, (out, lse) come back."""
    rank, size = comm.rank, comm.size
    num_kv, dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv
    lse_cols = max(1, 4 // q.element_size())  # lse fp32 travels bit-exact in q's dtype
    width = group * (dim + lse_cols)
    q_idx = [lv.index(rank, h, q.device) for h in range(num_kv)]
    mine = torch.cat([q[idx, h * group:(h + 1) * group].reshape(-1)
                      for h, idx in enumerate(q_idx)])
    empty = q.new_empty(0)
    sends = [mine if dst in lv.far[rank] else empty for dst in range(size)]
    shapes = [(sum(lv.counts(src, num_kv)) * group * dim if rank in lv.far[src] else 0,)
              for src in range(size)]
    recv = comm.all_to_all(sends, shapes)
    kv_idx = [lv.index(rank, h, k.device) for h in range(num_kv)]
    replies = []
    for src in range(size):
        if rank not in lv.far[src]:
            replies.append(empty)
            continue
        counts = lv.counts(src, num_kv)
        blocks = [_pack(*_attend(rows.view(m, group, dim), k[kv_idx[h], h], v[kv_idx[h], h],
                                 scale), q.dtype)
                  for h, (rows, m) in enumerate(zip(recv[src].split(
                      [m * group * dim for m in counts]), counts, strict=True))]
        replies.append(torch.cat(blocks))
    counts = lv.counts(rank, num_kv)
    shapes = [(sum(counts) * width if src in lv.far[rank] else 0,) for src in range(size)]
    back = comm.all_to_all(replies, shapes)
    if not len(lv.far[rank]) or not q.shape[0]:
        return None
    out = q.new_zeros(q.shape, dtype=torch.float32)  # rows not sampled: no far keys
    lse = q.new_full(q.shape[:2], float("-inf"), dtype=torch.float32)
    per_holder = [back[src].split([c * width for c in counts]) for src in lv.far[rank]]
    for h, idx in enumerate(q_idx):
        parts = [_unpack(blocks[h].view(counts[h], group, dim + lse_cols), dim)
                 for blocks in per_holder]
        o, s = merge_attn_states([p[0] for p in parts], [p[1] for p in parts])
        out[idx, h * group:(h + 1) * group] = o
        lse[idx, h * group:(h + 1) * group] = s
    return out, lse


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale):
    """q [m, G, D] against one KV head's keys k/v [c, D], all visible -> fp32 out, lse [m, G]."""
    if not k.shape[0] or not q.shape[0]:
        return (q.new_zeros(q.shape, dtype=torch.float32),
                q.new_full(q.shape[:2], float("-inf"), dtype=torch.float32))
    m, g, d = q.shape  # the G heads share k/v: m G rows of one head, k/v not repeated
    out, lse = partial_attention(q.reshape(m * g, 1, d), k[:, None], v[:, None], scale=scale)
    return out.reshape(m, g, d).float(), lse.reshape(m, g)


def _pack(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out [m, G, D], lse [m, G] fp32 -> flat [m * G * (D + lse_cols)] in dtype."""
    if torch.finfo(dtype).bits >= 32:
        tail = lse.to(dtype)[..., None]
    else:  # NOTE: reinterpret the fp32 bits as 2 bf16/fp16 columns, no rounding
        tail = lse.contiguous()[..., None].view(dtype)
    return torch.cat([out.to(dtype), tail], dim=-1).reshape(-1)


def _unpack(block: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, G, D + lse_cols] -> out [m, G, D] and lse [m, G], both fp32."""
    tail = block[..., dim:]
    lse = tail.float() if block.element_size() >= 4 else tail.contiguous().view(torch.float32)
    return block[..., :dim].float(), lse[..., 0]
