"""A step as its instances see it: ranks counted from the step's first instance.

The scheduler names global SP ranks in a Step (kv_ranges, leader, sp_chunk_lens' index) so that
one SchedulerOutput reads the same everywhere. A worker runs a step on the process group of its
instances, in which the first instance is rank 0; `local_output` shifts every rank by the
step's first instance and cuts chunk lengths to the step, so the model runner and the attention
plans work with any step as if its instances were the whole SP group. Pure Python.
"""

from __future__ import annotations

from dataclasses import replace

from csps.contract.step import KvMove, ScheduledRequest, SchedulerOutput, Step
from csps.contract.token_range import TokenRange


def local_output(step: Step) -> SchedulerOutput:
    """The step's SchedulerOutput with ranks counted from step.instances[0]. Raises ValueError
    when a request names a rank outside the step (its KV or its work would be unreachable)."""
    first, size = step.instances[0], len(step.instances)
    output = step.scheduler_output
    if first == 0 and all(_fits(r, size) for r in output.scheduled_requests) and all(
            m.src.rank < size and m.dst.rank < size for m in output.kv_moves):
        return output  # a step from rank 0 reads the same locally
    return replace(output, scheduled_requests=[_shift(r, first, size)
                                               for r in output.scheduled_requests],
                   kv_moves=[_shift_move(m, first, size) for m in output.kv_moves])


def _shift_move(move: KvMove, first: int, size: int) -> KvMove:
    if not all(first <= r < first + size for r in (move.src.rank, move.dst.rank)):
        raise ValueError(f"{move.request_id}: KV move {move.src.rank} -> {move.dst.rank} "
                         f"outside the step's instances {first} .. {first + size - 1}")
    return KvMove(move.request_id, replace(move.src, rank=move.src.rank - first),
                  replace(move.dst, rank=move.dst.rank - first))


def _fits(request: ScheduledRequest, size: int) -> bool:
    lens = request.sp_chunk_lens
    return lens is None or len(lens) == size


def _shift(request: ScheduledRequest, first: int, size: int) -> ScheduledRequest:
    inside = range(first, first + size)
    ranks = {r.rank for r in request.kv_ranges} | ({request.leader} if request.kv_ranges else set())
    lens = request.sp_chunk_lens
    if lens is not None:
        ranks |= {rank for rank, n in enumerate(lens) if n}
    if not ranks <= set(inside):
        raise ValueError(f"{request.request_id}: ranks {sorted(ranks)} outside the step's "
                         f"instances {first} .. {first + size - 1}")
    kv_ranges = tuple(TokenRange(r.rank - first, r.start, r.end, r.block_ids)
                      for r in request.kv_ranges)
    return replace(request, kv_ranges=kv_ranges,
                   leader=request.leader - first if request.kv_ranges else request.leader,
                   sp_chunk_lens=None if lens is None else tuple(lens[first:first + size]))
