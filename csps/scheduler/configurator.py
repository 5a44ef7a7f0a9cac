"""The sps2 configurator: per long request, the SP configuration of least predicted TTFT.

CSPS's "objective-oriented configuring" (algorithms.md §2.5, our design): candidates are an SP
degree d from the allowed degrees, for d > 1 the contiguous group of d ranks with the most free
blocks among those whose pools hold the request's block-aligned chunks, and (under CSA) level
and micro-batch candidates with P standing for d; d = 1 is the local chunked path on the rank
with the most free blocks. Predicted TTFT = queueing + prefill:
- SP (d > 1): an SP prefill waits until no local prefill is in flight (Sps2Policy's rule), so
  queueing = the in-flight prompts' remaining tokens run in budget-sized local iterations, each
  followed by one decode iteration while decodes run (prefill and decode alternate); then one
  iteration of the SP prefill.
- local (d = 1): its own chunks (budget-sized, each over its cached prefix), with one decode
  iteration between consecutive chunks while decodes run.
Ties go to the smaller degree. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from csps.kvcache.kv_cache_manager import cdiv
from csps.kvcache.placement import split_prompt
from csps.parallel.csa_config import CsaConfig
from csps.scheduler.sp_books import SpPrefillPlan

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.predictor import StepPredictor
    from csps.scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class SpChoice:
    """The configurator's answer: degree 1 = local chunked prefill on `ranks[0]`."""

    degree: int
    ranks: tuple[int, ...]
    ttft_s: float  # predicted queueing + prefill
    plan: SpPrefillPlan | None = None  # the SP prefill (degree > 1)


class Sps2Configurator:
    def __init__(self, predictor: StepPredictor, allowed_degrees: Sequence[int] | None = None,
                 csa_candidates: str = "", micro_batch_candidates: str = "") -> None:
        self.predictor = predictor
        self.allowed_degrees = tuple(allowed_degrees) if allowed_degrees else None
        self.csa_candidates = [c.strip() for c in csa_candidates.split(";") if c.strip()]
        self.micro_batch_candidates = [
            "" if c.strip().lower() == "none" else c.strip()
            for c in micro_batch_candidates.split(";") if c.strip()]

    def choose(self, scheduler: Scheduler, request: Request) -> SpChoice | None:
        """The least-TTFT candidate whose KV fits now; None when none fits."""
        sp_size = scheduler.sp_size
        degrees = self.allowed_degrees or (1, sp_size)
        decode_s = self._decode_time(scheduler)
        free = [pool.num_free_blocks for pool in scheduler.kv_cache_manager.pools]  # [sp_size]
        best, queue_s = None, None
        for degree in sorted(set(degrees)):
            if not 1 <= degree <= sp_size or degree > request.num_tokens:
                continue
            if degree > 1 and queue_s is None:  # the same for every SP degree
                queue_s = self._sp_queue(scheduler, decode_s)
            for choice in self._candidates(scheduler, request, degree, decode_s, free, queue_s):
                if best is None or choice.ttft_s < best.ttft_s:
                    best = choice
        return best

    def _candidates(self, scheduler: Scheduler, request: Request, degree: int,
                    decode_s: float, free: list[int], queue_s: float | None) -> list[SpChoice]:
        """free: each rank's free blocks now (the pools do not change while choosing)."""
        block_size, n = scheduler.kv_cache_manager.block_size, request.num_tokens
        if degree == 1:
            rank = max(range(scheduler.sp_size), key=lambda r: (free[r], -r))
            if cdiv(n, block_size) > free[rank]:
                return []
            return [SpChoice(1, (rank,), self._local_ttft(scheduler, rank, n, decode_s))]
        lens = split_prompt(n, degree, block_size)
        group = _most_free_group([cdiv(length, block_size) for length in lens], free)
        if group is None:
            return []
        chunk_lens = [0] * scheduler.sp_size
        for rank, length in zip(group, lens, strict=True):
            chunk_lens[rank] = length
        choices = []
        for attention, levels, micro_batch in self._attention_candidates(degree):
            plan = SpPrefillPlan(tuple(chunk_lens), sp_attention=attention, csa_levels=levels,
                                 csa_micro_batch=micro_batch)
            prefill_s = self.predictor.sp_prefill_time(chunk_lens, attention, levels,
                                                       micro_batch)
            choices.append(SpChoice(degree, group, queue_s + prefill_s, plan))
        return choices

    def _attention_candidates(self, degree: int) -> list[tuple]:
        """(sp_attention, csa_levels, csa_micro_batch), None meaning the engine's value."""
        parallel = self.predictor.parallel
        if parallel.sp_attention != "csa":
            return [(None, None, None)]
        full = degree == parallel.sequence_parallel_size
        default = None if full else f"1:1,{degree}:2"
        levels = [c.replace("P", str(degree)) for c in self.csa_candidates] or [default]
        levels = [lv for lv in levels if lv is None or _valid_levels(lv, degree)]
        levels = [None if full and lv == parallel.resolved_csa_levels else lv for lv in levels]
        batches = [None if mb == parallel.csa_micro_batch else mb
                   for mb in self.micro_batch_candidates] or [None]
        return [(None, lv, mb) for lv in dict.fromkeys(levels) for mb in dict.fromkeys(batches)]

    def _local_ttft(self, scheduler: Scheduler, rank: int, n: int, decode_s: float) -> float:
        budget, total, cached = scheduler.token_budget, 0.0, 0
        while cached < n:
            chunk = min(budget, n - cached)
            total += self.predictor.local_prefill_time([(rank, chunk, cached)])
            cached += chunk
            total += decode_s if cached < n else 0.0
        return total

    def _sp_queue(self, scheduler: Scheduler, decode_s: float) -> float:
        remaining = sum(r.num_tokens - r.num_computed_tokens for r in scheduler.running
                        if r.is_prefill)
        iterations = -(-remaining // scheduler.token_budget)
        if not iterations:
            return 0.0
        chunk = [(0, min(remaining, scheduler.token_budget), 0)]
        return iterations * (self.predictor.local_prefill_time(chunk) + decode_s)

    def _decode_time(self, scheduler: Scheduler) -> float:
        """One decode iteration of the running decodes (0 if none), each on its leader."""
        decodes = [(scheduler.leader_of(r.request_id), r.num_tokens) for r in scheduler.running
                   if not r.is_prefill]
        return self.predictor.decode_time(decodes) if decodes else 0.0


def _most_free_group(need: list[int], free: list[int]) -> tuple[int, ...] | None:
    """The window of len(need) consecutive ranks where rank start + i has need[i] free blocks,
    with the most free blocks in all (ties: the lowest start); None if none fits."""
    degree, best, best_free = len(need), None, -1
    window_free = sum(free[:degree])
    for start in range(len(free) - degree + 1):
        if start:
            window_free += free[start + degree - 1] - free[start - 1]
        if window_free > best_free and all(
                k <= f for k, f in zip(need, free[start:start + degree], strict=True)):
            best, best_free = start, window_free
    return None if best is None else tuple(range(best, best + degree))


def _valid_levels(levels: str, degree: int) -> bool:
    try:
        CsaConfig.parse(levels).check_sp_size(degree)
    except ValueError:
        return False
    return True
