"""The loongserve policy: LoongServe's elastic sequence parallelism (algorithms.md §3) on the
scheduler's SP books, within what the workers run. No torch.

Each iteration:
1. Admission (FCFS, no overtaking): waiting requests join this iteration's prefill while their
   KV (prompt + decode headroom) fits the free pools and LoongServe's test passes: a request
   the idle ranks (holding no decode KV) can serve is admitted when running it there now is at
   most the expected wait slower than on every rank (T_idle - T_all <= wait); one that needs
   decode ranks is admitted when pausing the decodes costs no more than waiting costs the
   prompts (T_all * sum_decodes 1/len <= wait * sum_prompts 1/len, len = a request's whole
   length so far, prompt plus output: the delay's cost to its normalised latency). wait = the
   decodes' mean remaining max_tokens x one predicted decode iteration.
2. Batching: the DP of loongserve_batching.py over the ranks, idle ranks first (most free
   first), then decode ranks by their decodes' sum of 1/len.
3. Instance borrowing: the plan may use decode ranks one at a time only while the predicted
   gain, the drop in sum TTFT/len, beats the paused decodes' loss, the plan's time x their sum
   of 1/len. Decodes touching a borrowed rank the plan uses skip the iteration.
4. A group of one rank is local prefills of whole prompts; a larger group is one ring SP
   prefill (with max_sp_batch 1) whose KV the ring leaves on the fewest of its ranks, most free
   first, that hold the prompt plus decode headroom (scale-down, scale_down_plan). An SP
   prefilled request's decode group is the whole SP group: its decode KV grows on the
   least-loaded rank (scale-up). A local request's decode KV stays on its rank while that
   has room and then moves to the least-loaded rank (a "sticky" placement: LoongServe scales
   up under memory pressure only). Masters are rebalanced under compute pressure
   (rebalance_masters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from csps.kvcache.causal_split import causal_balanced_split
from csps.kvcache.placement import split_prompt
from csps.scheduler.loongserve_admission import LoongServeAdmission, sorted_by_length
from csps.scheduler.loongserve_batching import PrefillGroup, PrefillPlan, fit_prefill_cost
from csps.scheduler.sp_books import SpPrefillSchedule

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.books import SchedulerBooks
    from csps.scheduler.predictor import StepPredictor


class LoongServePolicy(LoongServeAdmission):
    name = "loongserve"
    chunks_prefill = False  # prompts prefill whole

    def __init__(self, predictor: StepPredictor | None, allowed_degrees: Sequence[int] | None
                 = None, max_sp_batch: int = 1, decode_headroom: int = 256,
                 max_new_per_iteration: int = 8, sp_prefill_alone: bool = True) -> None:
        if predictor is None:
            raise ValueError("the loongserve policy needs a cost model (--cost-model)")
        self.predictor = predictor
        self.allowed_degrees = tuple(allowed_degrees) if allowed_degrees else None
        self.max_sp_batch = max_sp_batch
        self.decode_headroom = decode_headroom  # KV tokens kept free per request for decode
        self.max_new_per_iteration = max_new_per_iteration  # bounds the DP's size
        self.sp_prefill_alone = sp_prefill_alone  # the workers run an SP prefill alone
        self.fits = None  # degree -> PrefillCostFit, fitted on the first schedule()
        self.balance_ring = False  # causal-balanced ring chunks (kvcache/causal_split.py)
        self._ring_work = None  # (per token, per attention pair) seconds on one rank

    def fit(self, sp_size: int, max_len: int, block_size: int) -> None:
        """Fit T_m = A + B*sum(l) + C*sum(l^2) per allowed degree m on predictor samples."""
        degrees = sorted({d for d in self.allowed_degrees or (1, sp_size) if 1 <= d <= sp_size})
        lengths = sorted({max(block_size, max_len >> s) for s in range(8)})
        self.fits = {}
        if self.balance_ring:  # a chunk's work on one rank: per_token * n + per_pair * pairs
            local = fit_prefill_cost([([n], self.predictor.local_prefill_time([(0, n, 0)]))
                                      for n in lengths])
            self._ring_work = (local.b, 2 * local.c)
        for m in degrees:
            samples = []
            for n in lengths:
                if m == 1:
                    for batch in ([n], [n, n], [n, max(1, n // 2)]):
                        chunks = [(0, x, 0) for x in batch]
                        samples.append((batch, self.predictor.local_prefill_time(chunks)))
                else:
                    lens = self._split(n, m, block_size) + [0] * (sp_size - m)
                    samples.append(([n], self.predictor.sp_prefill_time(lens)))
            self.fits[m] = fit_prefill_cost(samples)

    def schedule(self, scheduler: SchedulerBooks, batch: BatchBuilder) -> None:
        if self.fits is None:
            self.fit(scheduler.sp_size, scheduler.max_model_len,
                     scheduler.kv_cache_manager.block_size)
        decodes = [r for r in scheduler.running if not r.is_prefill]
        admitted = self.admit(scheduler, decodes)
        plan, paused_ranks = self.plan(scheduler, admitted, decodes) if admitted else (None, ())
        where = self._placements(scheduler, plan, admitted)
        if not (self.sp_prefill_alone and any(len(g.ranks) > 1 for g in where.values())):
            self.rebalance_masters(scheduler, decodes)
            for request in decodes:
                if (request in scheduler.running and not self._touches(scheduler, request,
                                                                       paused_ranks)
                        and not scheduler.schedule_decode(request, batch)):
                    break
        self._start(scheduler, batch, where)

    # ---- carrying out the plan --------------------------------------------------------------
    def _placements(self, scheduler: SchedulerBooks, plan: PrefillPlan | None,
                    admitted: list[Request]) -> dict[str, PrefillGroup]:
        """request id -> its group. When an SP prefill must run alone, only the waiting head's
        SP group (just the head) or else only the local groups."""
        if plan is None:
            return {}
        ordered = sorted_by_length(admitted)
        where = {ordered[i].request_id: g for g in plan.groups for i in g.requests}
        if self.sp_prefill_alone and any(len(g.ranks) > 1 for g in plan.groups):
            head = scheduler.waiting[0].request_id
            if len(where[head].ranks) > 1:
                return {head: where[head]}
            return {rid: g for rid, g in where.items() if len(g.ranks) == 1}
        return where

    def _start(self, scheduler: SchedulerBooks, batch: BatchBuilder,
               where: dict[str, PrefillGroup]) -> None:
        """Admit the planned requests in FCFS order (each is then the waiting head)."""
        while scheduler.waiting and scheduler.waiting[0].request_id in where:
            request = scheduler.waiting[0]
            group = where.pop(request.request_id)
            if len(group.ranks) == 1:
                ok = scheduler.admit_local(request, batch, rank=group.ranks[0], chunked=False,
                                           spill=True)
            else:
                ok = scheduler.admit_sequence_parallel(
                    request, batch, self.scale_down_plan(scheduler, request, group.ranks),
                    alone=self.sp_prefill_alone)
            if not ok:
                return

    def _split(self, num_tokens: int, parts: int, block_size: int) -> list[int]:
        if self._ring_work is None:
            return split_prompt(num_tokens, parts, block_size)
        return causal_balanced_split(num_tokens, parts, block_size, *self._ring_work)

    def group_chunks(self, scheduler: SchedulerBooks, num_tokens: int,
                     group: Sequence[int]) -> list[int]:
        """A prompt split block-aligned over the group in rank order, per SP rank (0 outside):
        evenly, or with balance_ring so that every rank's causal work is equal."""
        members, chunk_lens = sorted(group), [0] * scheduler.sp_size
        for rank, length in zip(members, self._split(
                num_tokens, len(members), scheduler.kv_cache_manager.block_size), strict=True):
            chunk_lens[rank] = length
        return chunk_lens

    def scale_down_plan(self, scheduler: SchedulerBooks, request: Request,
                        group: Sequence[int]) -> SpPrefillSchedule:
        """Chunks computed over the group in rank order; KV kept on the fewest group ranks, most
        free first, whose free blocks hold the prompt plus headroom, each filled in turn; every
        other SP rank joins the decode group with 0 tokens (scale-up room)."""
        manager, n = scheduler.kv_cache_manager, request.num_tokens
        chunk_lens = self.group_chunks(scheduler, n, group)
        by_free = sorted(group, key=lambda r: (-manager.pools[r].num_free_blocks, r))
        need, kept, room = self.need(scheduler, request), [], 0
        for rank in by_free:
            if room >= need and room >= n:
                break
            kept.append(rank)
            room += manager.pools[rank].num_free_blocks * manager.block_size
        kv_lens, left = [], n
        for rank in kept:
            take = min(left, manager.pools[rank].num_free_blocks * manager.block_size)
            kv_lens.append(take)
            left -= take
        others = [r for r in range(scheduler.sp_size) if r not in kept]
        return SpPrefillSchedule(tuple(chunk_lens), tuple(kv_lens) + (0,) * len(others),
                             tuple(kept + others))

    def rebalance_masters(self, scheduler: SchedulerBooks, decodes: list[Request]) -> None:
        """Compute pressure: while one rank leads 2+ more decodes than another, hand the
        newest of its decodes that holds KV on the least busy rank to that rank."""
        counts = dict.fromkeys(range(scheduler.sp_size), 0)
        for request in decodes:
            counts[scheduler.leader_of(request.request_id)] += 1
        for _ in range(len(decodes)):
            busiest, idlest = max(counts, key=counts.get), min(counts, key=counts.get)
            if counts[busiest] - counts[idlest] <= 1:
                return
            movable = [r for r in reversed(decodes)
                       if scheduler.leader_of(r.request_id) == busiest
                       and idlest in scheduler.kv_cache_manager.placement(r.request_id).ranks]
            if not movable:
                return
            scheduler.set_leader(movable[0].request_id, idlest)
            counts[busiest] -= 1
            counts[idlest] += 1
