"""CSA far levels as a communication-computation-communication pipeline (algorithms.md §2.3).

Each far level's exchange (csa.py) is split into micro-batches: micro_batch_heads KV heads
(with their G query heads) x a slice of micro_batch_tokens travelling rows per head and sender
(0 = whole); the micro-batches of every far level form one schedule, the same on every rank.
far_queries "sampled": phase 1 sends the micro-batch's sampled query rows to the key holders,
phase 2 attends them there to the holder's sampled K/V, phase 3 returns out and lse packed in
one tensor; in steady state send(m+1) || compute(m) || return(m-1), with asynchronous
all-to-alls (Communicator.start_all_to_all). far_queries "all": phase 1 sends the slice of
sampled K/V rows, phase 2 attends every local query to it; no phase 3 (send(m+1) ||
compute(m)). Per micro-batch partials are merged into running fp32 (out, lse) (merge.py), so
the result equals csa.py's within rounding and the bytes are the same; only the number of
collectives grows (1 or 2 per micro-batch instead of per level).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from csps.attention.merge import merge_attn_states
from csps.contract.csa_config import CsaConfig
from csps.parallel.comm import Communicator
from csps.parallel.csa import _attend, _far_ranks, _Level, _pack, _unpack
from csps.parallel.sp_layout import chunk_starts


@dataclass(frozen=True)
class _Batch:
    """One micro-batch: a level, KV heads [h0, h1), travelling-row slice [t0, t1) per head."""

    lv: _Level
    heads: range
    t0: int
    t1: int

    def rows(self, rank: int, head: int) -> list[int]:
        return self.lv.rows(rank, head)[self.t0:self.t1]

    def index(self, rank: int, head: int, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.rows(rank, head), dtype=torch.int64, device=device)

    def count(self, rank: int) -> int:
        """Travelling rows of sender `rank` in this micro-batch, over its heads."""
        return sum(len(self.rows(rank, h)) for h in self.heads)


def far_geometry(config: CsaConfig, chunk_lens) -> list[_Level]:
    """The far levels' geometry, as csa_attention builds it (for far_levels callers)."""
    size, starts = len(chunk_lens), chunk_starts(chunk_lens)
    return [_Level([_far_ranks(r, config.levels[i - 1][0], group) for r in range(size)],
                   stride, starts) for i, (group, stride) in enumerate(config.levels) if i]


def schedule(levels: list[_Level], num_kv: int, config: CsaConfig) -> list[_Batch]:
    """Micro-batches of every far level, level by level, then head group, then row slice."""
    step_h = config.micro_batch_heads or num_kv
    batches = []
    for lv in levels:
        senders = [r for r in range(len(lv.far)) if lv.far[r]] if (
            config.far_queries == "sampled") else sorted({j for f in lv.far for j in f})
        most = max((len(lv.rows(r, h)) for r in senders for h in range(num_kv)), default=0)
        step_t = config.micro_batch_tokens or max(most, 1)
        for h0 in range(0, num_kv, step_h):
            for t0 in range(0, max(most, 1), step_t):
                batches.append(_Batch(lv, range(h0, min(h0 + step_h, num_kv)), t0, t0 + step_t))
    return batches


def far_levels(q, k, v, levels: list[_Level], comm: Communicator, scale, config: CsaConfig,
               *, overlap: bool = True, timings: dict | None = None):
    """All far levels of csa_attention, pipelined: fp32 (out [n_r, Hq, D], lse [n_r, Hq])
    (rows or heads with no far key: 0, -inf), or None when this rank has no far keys.

    overlap=False runs the phases one after another instead (send all micro-batches, compute
    all, return all), for measuring; timings, if given, gets seconds per phase added then.
    """
    acc = _Acc(q)
    stage = (_Sampled if config.far_queries == "sampled" else _Keys)(q, k, v, comm, scale, acc)
    batches = schedule(levels, k.shape[1], config)
    if overlap:
        _pipelined(stage, batches, comm)
    else:
        _sequential(stage, batches, comm, {} if timings is None else timings)
    if not q.shape[0] or not any(len(lv.far[comm.rank]) for lv in levels):
        return None
    return acc.out, acc.lse


def _pipelined(stage, batches: list[_Batch], comm: Communicator) -> None:
    """Start order S0, S1, R0, S2, R1, ... on every rank: send(m+1) || compute(m) ||
    return(m-1)."""
    sending = comm.start_all_to_all(*stage.send(batches[0])) if batches else None
    back = None  # (batch, pending return) of the previous micro-batch
    for m, batch in enumerate(batches):
        after = comm.start_all_to_all(*stage.send(batches[m + 1])) if m + 1 < len(batches) \
            else None
        reply = stage.compute(batch, sending.wait())
        returning = comm.start_all_to_all(*reply) if reply is not None else None
        if back is not None:
            stage.collect(back[0], back[1].wait())
        back = (batch, returning) if returning is not None else None
        sending = after
    if back is not None:
        stage.collect(back[0], back[1].wait())


def _sequential(stage, batches: list[_Batch], comm: Communicator, timings: dict) -> None:
    def timed(phase, fn, items):
        start = time.perf_counter()
        result = [fn(*item) for item in items]
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
        return result

    recvs = timed("send_s", lambda b: comm.start_all_to_all(*stage.send(b)).wait(),
                  [(b,) for b in batches])
    replies = timed("compute_s", stage.compute, list(zip(batches, recvs, strict=True)))
    if stage.returns:
        backs = timed("return_s", lambda r: comm.start_all_to_all(*r).wait(),
                      [(r,) for r in replies])
        timed("merge_s", stage.collect, list(zip(batches, backs, strict=True)))


class _Acc:
    """Running fp32 merge of far partials: out [n_r, Hq, D], lse [n_r, Hq]."""

    def __init__(self, q: torch.Tensor) -> None:
        self.out = q.new_zeros(q.shape, dtype=torch.float32)
        self.lse = q.new_full(q.shape[:2], float("-inf"), dtype=torch.float32)

    def add(self, rows, cols: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge a partial for out[rows, cols] (rows: index tensor or slice)."""
        o, s = merge_attn_states([self.out[rows, cols], out], [self.lse[rows, cols], lse])
        self.out[rows, cols] = o
        self.lse[rows, cols] = s


class _Keys:
    """far_queries "all": phase 1 the K/V slice to the later ranks, phase 2 local queries."""

    returns = False

    def __init__(self, q, k, v, comm, scale, acc: _Acc) -> None:
        self.q, self.k, self.v, self.comm, self.scale, self.acc = q, k, v, comm, scale, acc
        self.dim, self.group = k.shape[2], q.shape[1] // k.shape[1]
        self.q_heads: dict[int, torch.Tensor] = {}  # KV head -> its G query heads [n_r, G, D]

    def send(self, b: _Batch):
        rank, k, v = self.comm.rank, self.k, self.v
        mine = torch.cat([torch.stack([k[idx, h], v[idx, h]]).reshape(-1) for h in b.heads
                          for idx in [b.index(rank, h, k.device)]])
        empty = k.new_empty(0)
        sends = [mine if rank in b.lv.far[dst] else empty for dst in range(self.comm.size)]
        shapes = [(2 * b.count(src) * self.dim if src in b.lv.far[rank] else 0,)
                  for src in range(self.comm.size)]
        return sends, shapes

    def compute(self, b: _Batch, recv) -> None:
        far, g = b.lv.far[self.comm.rank], self.group
        if not len(far) or not self.q.shape[0]:
            return None
        per_head = [[] for _ in b.heads]
        for src in far:
            counts = [len(b.rows(src, h)) for h in b.heads]
            blocks = recv[src].split([2 * c * self.dim for c in counts])
            for i, (block, c) in enumerate(zip(blocks, counts, strict=True)):
                per_head[i].append(block.view(2, c, self.dim))
        for h, blocks in zip(b.heads, per_head, strict=True):
            kv = torch.cat(blocks, dim=1)  # [2, C, D]
            if h not in self.q_heads:  # contiguous once, not per micro-batch
                self.q_heads[h] = self.q[:, h * g:(h + 1) * g].contiguous()
            out, lse = _attend(self.q_heads[h], kv[0], kv[1], self.scale)
            self.acc.add(slice(None), slice(h * g, (h + 1) * g), out, lse)
        return None


class _Sampled:
    """far_queries "sampled": phase 1 query rows out, phase 2 at the holders, phase 3 back."""

    returns = True

    def __init__(self, q, k, v, comm, scale, acc: _Acc) -> None:
        self.q, self.k, self.v, self.comm, self.scale, self.acc = q, k, v, comm, scale, acc
        self.dim, self.group = k.shape[2], q.shape[1] // k.shape[1]
        self.lse_cols = max(1, 4 // q.element_size())  # lse fp32 bit-exact in q's dtype
        self.width = self.group * (self.dim + self.lse_cols)
        self.held: dict[tuple[int, int], tuple] = {}  # (level, KV head) -> sampled k, v [c, D]

    def send(self, b: _Batch):
        rank, q, g = self.comm.rank, self.q, self.group
        mine = torch.cat([q[b.index(rank, h, q.device), h * g:(h + 1) * g].reshape(-1)
                          for h in b.heads])
        empty = q.new_empty(0)
        sends = [mine if dst in b.lv.far[rank] else empty for dst in range(self.comm.size)]
        shapes = [(b.count(src) * g * self.dim if rank in b.lv.far[src] else 0,)
                  for src in range(self.comm.size)]
        return sends, shapes

    def compute(self, b: _Batch, recv):
        rank, k, v, g, dim = self.comm.rank, self.k, self.v, self.group, self.dim
        replies, empty = [], self.q.new_empty(0)
        for src in range(self.comm.size):
            if rank not in b.lv.far[src]:
                replies.append(empty)
                continue
            counts = [len(b.rows(src, h)) for h in b.heads]
            blocks = []
            for h, rows, m in zip(b.heads, recv[src].split([m * g * dim for m in counts]),
                                  counts, strict=True):
                key = (id(b.lv), h)  # the holder's sampled keys of the whole level, once
                if key not in self.held:
                    idx = b.lv.index(rank, h, k.device)
                    self.held[key] = k[idx, h], v[idx, h]
                blocks.append(_pack(*_attend(rows.view(m, g, dim), *self.held[key], self.scale),
                                    self.q.dtype))
            replies.append(torch.cat(blocks) if blocks else empty)
        far = b.lv.far[rank]
        shapes = [(b.count(rank) * self.width if src in far else 0,)
                  for src in range(self.comm.size)]
        return replies, shapes

    def collect(self, b: _Batch, back) -> None:
        rank, g = self.comm.rank, self.group
        far = b.lv.far[rank]
        if not len(far) or not self.q.shape[0]:
            return
        counts = [len(b.rows(rank, h)) for h in b.heads]
        per_holder = [back[src].split([c * self.width for c in counts]) for src in far]
        for i, (h, c) in enumerate(zip(b.heads, counts, strict=True)):
            if not c:
                continue
            parts = [_unpack(blocks[i].view(c, g, self.dim + self.lse_cols), self.dim)
                     for blocks in per_holder]
            o, s = merge_attn_states([p[0] for p in parts], [p[1] for p in parts])
            self.acc.add(b.index(rank, h, self.q.device), slice(h * g, (h + 1) * g), o, s)
