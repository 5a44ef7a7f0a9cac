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
Ties go to the smaller degree.

On per-instance steps an SP prefill runs in slices (sp_books.slice_prompt), each a step that
carries the running decodes. With an SLO on the time between tokens (`--slo-tbt`) the slice
size is chosen too: per candidate group, slices of 1, 2, 4, ... blocks per rank or the whole
prompt; the prompt's time is the sum of its slices' (each priced with the earlier slices' KV
it attends to: linear in the slice's index, so the first, the last full and the final slice
give the sum exactly under a linear cost model) and its step time the largest slice's plus one
decode step. The least-TTFT candidate whose step time stays under the SLO wins; if none does,
the one with the shortest step. Without an SLO every SP prefill slices at the fixed chunk.
With a decode-free slack F (`--consolidate-decode-kv`) the best choice on instances no running
request touches wins whenever its TTFT is at most F times the best choice's.
No torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from csps.contract.csa_config import CsaConfig
from csps.contract.sp_attention import SpAttention
from csps.kvcache.kv_cache_manager import cdiv
from csps.kvcache.placement import split_prompt
from csps.kvcache.prefix_cache import NO_PREFIX, CachedPrefix
from csps.scheduler.slicing import chunk_candidates, sliced_time
from csps.scheduler.sp_books import SpPrefillSchedule, pins_to_rank

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.books import SchedulerBooks
    from csps.scheduler.predictor import StepPredictor


@dataclass(frozen=True)
class SpChoice:
    """The configurator's answer: degree 1 = local chunked prefill on `ranks[0]`."""

    degree: int
    ranks: tuple[int, ...]
    ttft_s: float  # predicted queueing + prefill
    plan: SpPrefillSchedule | None = None  # the SP prefill (degree > 1)
    chunk: int = 0  # tokens per rank of a slice (0: the prompt whole in one step)
    step_s: float = 0.0  # predicted time of its longest step, decodes riding included


class Sps2Configurator:
    def __init__(self, predictor: StepPredictor, allowed_degrees: Sequence[int] | None = None,
                 csa_candidates: str = "", micro_batch_candidates: str = "",
                 slo_tbt: float | None = None, chunk: int = 0,
                 decode_free_slack: float = 0.0) -> None:
        """slo_tbt: seconds a step may take (None: no SLO, slices of `chunk` tokens per rank;
        0 = whole prompts). decode_free_slack: prefer the best group of instances no running
        request touches when its TTFT is at most this factor times the best (0: never)."""
        self.predictor = predictor
        self.decode_free_slack = decode_free_slack
        self.slo_tbt, self.chunk = slo_tbt, chunk
        self.allowed_degrees = tuple(allowed_degrees) if allowed_degrees else None
        self.csa_candidates = [c.strip() for c in csa_candidates.split(";") if c.strip()]
        self.micro_batch_candidates = [
            "" if c.strip().lower() == "none" else c.strip()
            for c in micro_batch_candidates.split(";") if c.strip()]

    def choose(self, scheduler: SchedulerBooks, request: Request) -> SpChoice | None:
        """The least-TTFT candidate whose KV fits now; None when none fits. Only the part
        after the request's cached prefix is priced and placed, on groups holding the prefix
        (degree 1: the prefix's rank); when no such group fits, the whole prompt is."""
        best = self._best(scheduler, request)
        if best is None or not self.decode_free_slack:
            return best
        busy = {i for r in scheduler.running for i in scheduler.span_of(r.request_id)}
        if not busy & set(best.ranks):
            return best
        apart = self._best(scheduler, request, busy)
        if apart is not None and apart.ttft_s <= self.decode_free_slack * best.ttft_s:
            return apart
        return best

    def _best(self, scheduler: SchedulerBooks, request: Request,
              busy: set[int] = frozenset()) -> SpChoice | None:
        """The least-TTFT choice on ranks outside `busy`."""
        prefix = scheduler.cached_prefix(request)
        choices = self._choices(scheduler, request, prefix, busy)
        if not choices and prefix.ranges:
            choices = self._choices(scheduler, request, NO_PREFIX, busy)
        return min(choices, key=lambda c: c.ttft_s, default=None)  # ties: the first

    def _choices(self, scheduler: SchedulerBooks, request: Request,
                 prefix: CachedPrefix, busy: set[int] = frozenset()) -> list[SpChoice]:
        sp_size, n = scheduler.sp_size, request.num_tokens - prefix.num_tokens
        degrees = self.allowed_degrees or range(1, sp_size + 1)
        decode_s = self._decode_time(scheduler)
        free = [-1 if r in busy else pool.num_free_blocks  # [sp_size]; busy ranks never fit
                for r, pool in enumerate(scheduler.kv_cache_manager.pools)]
        choices, queue_s = [], None
        for degree in sorted(set(degrees)):
            if not 1 <= degree <= sp_size or degree > n:
                continue
            if degree > 1 and queue_s is None:  # the same for every SP degree
                queue_s = self._sp_queue(scheduler, decode_s)
            choices += self._candidates(scheduler, (request, prefix), degree, decode_s, free,
                                        queue_s)
        if not choices and len(prefix.ranks) > 1:  # a short rest after a spread prefix
            choices = self._over_prefix(scheduler, (request, prefix), decode_s, free)
        if self.slo_tbt is not None and choices:
            within = [c for c in choices if c.step_s <= self.slo_tbt]
            choices = within or [min(choices, key=lambda c: c.step_s)]
        return choices

    def _candidates(self, scheduler: SchedulerBooks, work: tuple[Request, CachedPrefix],
                    degree: int, decode_s: float, free: list[int],
                    queue_s: float | None) -> list[SpChoice]:
        """work: the request and the cached prefix its rest follows; free: each rank's free
        blocks now (the pools do not change while choosing)."""
        (request, prefix), block_size = work, scheduler.kv_cache_manager.block_size
        n = request.num_tokens - prefix.num_tokens
        if degree == 1:
            if len(prefix.ranks) > 1:
                return []  # a prefix over several ranks is attended to by an SP prefill
            rank = prefix.ranks[0] if pins_to_rank(prefix, request.num_tokens) else max(
                range(scheduler.sp_size), key=lambda r: (free[r], -r))
            if rank not in prefix.ranks:  # what its admission there will find
                prefix = scheduler.cached_prefix(request, [rank])
                n = request.num_tokens - prefix.num_tokens
            if cdiv(n, block_size) > free[rank]:
                return []
            ttft_s, step_s = self._local_ttft(scheduler, rank, n, decode_s, prefix.num_tokens)
            return [SpChoice(1, (rank,), ttft_s, step_s=step_s)]
        lens = split_prompt(n, degree, block_size)
        group = _most_free_group([cdiv(length, block_size) for length in lens], free,
                                 prefix.ranks)
        if group is None:
            return []
        chunk_lens = [0] * scheduler.sp_size
        for rank, length in zip(group, lens, strict=True):
            chunk_lens[rank] = length
        choices = []
        for attention in self._attention_candidates(degree):
            plan = SpPrefillSchedule(tuple(chunk_lens), sp_attention=attention)
            for chunk in chunk_candidates(n, degree, block_size, self.slo_tbt, self.chunk):
                prefill_s, step_s = sliced_time(
                    n, group, chunk, block_size, scheduler.sp_size,
                    functools.partial(self.predictor.sp_prefill_time, sp_attention=attention))
                choices.append(SpChoice(degree, group, queue_s + prefill_s, plan, chunk,
                                        step_s + decode_s))
        return choices

    def _over_prefix(self, scheduler: SchedulerBooks, work: tuple[Request, CachedPrefix],
                     decode_s: float, free: list[int]) -> list[SpChoice]:
        """The rest as an SP prefill on the window of ranks holding the prefix, the one plan
        when no allowed degree covers the prefix. Every rank of an SP prefill computes some of
        it (the prefix it attends to must lie inside its group), so a rest with fewer tokens
        than the window has ranks takes back whole blocks of the prefix."""
        (request, prefix), block_size = work, scheduler.kv_cache_manager.block_size
        group = tuple(range(prefix.ranks[0], prefix.ranks[-1] + 1))
        prefix = prefix.leaving(request.num_tokens, len(group), block_size)
        n = request.num_tokens - prefix.num_tokens
        if n < len(group):
            return []
        lens = split_prompt(n, len(group), block_size)
        if any(cdiv(length, block_size) > free[r] for r, length in zip(group, lens, strict=True)):
            return []
        chunk_lens = [0] * scheduler.sp_size
        for rank, length in zip(group, lens, strict=True):
            chunk_lens[rank] = length
        attention = self.predictor.parallel.sp_attention_choice.for_group(len(group))
        prefill_s, step_s = sliced_time(
            n, group, 0, block_size, scheduler.sp_size,
            functools.partial(self.predictor.sp_prefill_time, sp_attention=attention))
        plan = SpPrefillSchedule(tuple(chunk_lens), sp_attention=attention)
        queue_s = self._sp_queue(scheduler, decode_s)
        return [SpChoice(len(group), group, queue_s + prefill_s, plan, 0, step_s + decode_s)]

    def _attention_candidates(self, degree: int) -> list[SpAttention]:
        """The deployment's SP attention on a group of `degree`, and under CSA each candidate
        of levels ('P' standing for the degree) and micro-batch."""
        base = self.predictor.parallel.sp_attention_choice.for_group(degree)
        if base.csa is None:
            return [base]
        levels = [c.replace("P", str(degree)) for c in self.csa_candidates]
        levels = [lv for lv in levels if _valid_levels(lv, degree)] or [None]
        batches = self.micro_batch_candidates or [None]
        return list(dict.fromkeys(base.with_csa(lv, mb) for lv in levels for mb in batches))

    def _local_ttft(self, scheduler: SchedulerBooks, rank: int, n: int, decode_s: float,
                    cached: int = 0) -> tuple[float, float]:
        """(TTFT, the longest step: a chunk with a decode step) of the local chunked path of
        n tokens after `cached` ones."""
        budget, total, longest = scheduler.token_budget, 0.0, 0.0
        n += cached
        while cached < n:
            chunk = min(budget, n - cached)
            seconds = self.predictor.local_prefill_time([(rank, chunk, cached)])
            longest = max(longest, seconds + decode_s)
            total += seconds
            cached += chunk
            total += decode_s if cached < n else 0.0
        return total, longest

    def _sp_queue(self, scheduler: SchedulerBooks, decode_s: float) -> float:
        remaining = sum(r.num_tokens - r.num_computed_tokens for r in scheduler.running
                        if r.is_prefill)
        iterations = -(-remaining // scheduler.token_budget)
        if not iterations:
            return 0.0
        chunk = [(0, min(remaining, scheduler.token_budget), 0)]
        return iterations * (self.predictor.local_prefill_time(chunk) + decode_s)

    def _decode_time(self, scheduler: SchedulerBooks) -> float:
        """One decode iteration of the running decodes (0 if none), each on its leader."""
        decodes = [(scheduler.leader_of(r.request_id), r.num_tokens) for r in scheduler.running
                   if not r.is_prefill]
        return self.predictor.decode_time(decodes) if decodes else 0.0


def _most_free_group(need: list[int], free: list[int],
                     holding: Sequence[int] = ()) -> tuple[int, ...] | None:
    """The window of len(need) consecutive ranks, covering the ranks `holding` (a cached
    prefix's), where rank start + i has need[i] free blocks, with the most free blocks in all
    (ties: the lowest start); None if none fits."""
    degree, best, best_free = len(need), None, -1
    window_free = sum(free[:degree])
    for start in range(len(free) - degree + 1):
        if start:
            window_free += free[start + degree - 1] - free[start - 1]
        if any(not start <= r < start + degree for r in holding):
            continue
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
