"""The scheduler's sequence-parallel books (algorithms.md §2.1, §2.4), mixed into Scheduler: SP
and local admission onto a DistributedKVCacheManager, each placed request's leader, and the
placement fields of a ScheduledRequest. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from csps.contract.sp_attention import SpAttention
from csps.kvcache.kv_cache_manager import cdiv
from csps.kvcache.placement import DistributedKVCacheManager, TokenRange, split_prompt
from csps.kvcache.prefix_cache import NO_PREFIX, CachedPrefix
from csps.request import RequestStatus

if TYPE_CHECKING:
    from csps.contract.step import ScheduledRequest
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder


@dataclass(frozen=True)
class SpPrefillSchedule:
    """How one SP prefill is scheduled. chunk_lens: tokens computed per SP rank, in rank order
    (0 = not in the group); kv_lens / kv_ranks: where its KV stays, in position order (empty:
    where it is computed; ranks listed with 0 tokens join its decode group, so decode KV may
    grow there); sp_attention: its own choice (None: the deployment's, resolved for the
    group when its steps are emitted)."""

    chunk_lens: tuple[int, ...]
    kv_lens: tuple[int, ...] = ()
    kv_ranks: tuple[int, ...] = ()
    sp_attention: SpAttention | None = None
    # A chunked SP prefill: per slice, in prompt order, its chunk length per SP rank (same
    # indexing as chunk_lens). Empty: one slice, chunk_lens.
    slices: tuple[tuple[int, ...], ...] = ()
    start: int = 0  # the prompt position of its first slice: its cached prefix's length

    def slice_at(self, start: int) -> tuple[int, ...]:
        """The chunk lengths of the slice beginning at prompt position `start`."""
        pos = self.start
        for lens in self.slices or (self.chunk_lens,):
            if pos == start:
                return lens
            pos += sum(lens)
        raise ValueError(f"no slice of this SP prefill starts at position {start}")


def pins_to_rank(prefix: CachedPrefix, num_tokens: int) -> bool:
    """A cached prefix on one rank keeps its request there when it covers at least half of
    its num_tokens prompt; a shorter one (a shared system prompt) would pile every request
    onto the rank that cached it first, so placement balances load instead (the request then
    hits what its own rank caches)."""
    return len(prefix.ranks) == 1 and 2 * prefix.num_tokens >= num_tokens


def slice_prompt(num_tokens: int, group: list[int], sp_size: int, chunk: int,
                 block_size: int) -> tuple[tuple[int, ...], ...]:
    """A chunked SP prefill's slices: each the next `chunk` tokens per rank of `group` (whole
    blocks), the last one the rest split by split_prompt (a rest too short to give every rank
    a token joins the slice before it); lengths indexed by SP rank."""
    per_rank = max(block_size, chunk // block_size * block_size)
    slices, left = [], num_tokens
    while left > 0:
        if left >= (per_rank + 1) * len(group):
            lens = [per_rank] * len(group)
        else:
            lens = split_prompt(left, len(group), block_size)
        row = [0] * sp_size
        for rank, n in zip(group, lens, strict=True):
            row[rank] = n
        slices.append(tuple(row))
        left -= sum(lens)
    return tuple(slices)


class SequenceParallelBooks:
    """Needs the Scheduler's kv_cache_manager, waiting, running, schedule_prefill,
    sp_attention (the deployment's SpAttention), and the _leaders / _sp_prefills dicts it
    creates."""

    @property
    def is_distributed(self) -> bool:
        return isinstance(self.kv_cache_manager, DistributedKVCacheManager)

    @property
    def sp_size(self) -> int:
        return len(self.kv_cache_manager.pools) if self.is_distributed else 1

    @property
    def rank_capacity_tokens(self) -> int:
        """Tokens one SP rank's KV pool holds when empty."""
        manager = self.kv_cache_manager
        blocks = manager.pools[0].num_blocks if self.is_distributed else manager.num_total_blocks
        return blocks * manager.block_size

    def admit_sequence_parallel(self, request: Request, batch: BatchBuilder,
                                plan: SpPrefillSchedule | None = None, alone: bool = True,
                                chunk: int = 0) -> bool:
        """Admit the waiting head as an SP prefill: its whole prompt in this iteration, chunk r
        computed on SP rank r (default plan: split over every rank, KV where it is computed).
        With `alone` (the workers' rule) it takes the iteration whole. The last computing rank,
        holding the last token, samples its first token; its decodes are then led by the
        KV-holding rank leading the fewest requests (a decode step needs only the token id,
        not the prefill's hidden state). False (nothing changes) if the KV does not fit.
        chunk > 0 (KV where computed): a chunked SP prefill of slices of `chunk` tokens per
        rank (slice_prompt), its first slice scheduled now, the rest in later steps."""
        manager = self.kv_cache_manager
        prefix = NO_PREFIX if plan is not None and plan.kv_lens else self.cached_prefix(request)
        if manager.prefix_cache.is_pending(request, prefix):
            return False  # another request is computing the next blocks: they will be cached
        if plan is None:  # every rank computes some of the rest: those holding the prefix too
            prefix = prefix.leaving(request.num_tokens, self.sp_size, manager.block_size)
            plan = SpPrefillSchedule(tuple(split_prompt(request.num_tokens - prefix.num_tokens,
                                                    self.sp_size, manager.block_size)))
            if min(plan.chunk_lens) < 1:
                return False
        group = [r for r, n in enumerate(plan.chunk_lens) if n]
        cached = request.num_tokens - sum(plan.chunk_lens)  # what the plan's maker counted on
        if cached < 0 or cached > prefix.num_tokens or cached % manager.block_size:
            return False
        prefix = prefix.leaving(request.num_tokens, sum(plan.chunk_lens), manager.block_size)
        suffix = request.num_tokens - prefix.num_tokens
        if sum(plan.chunk_lens) != suffix or (alone and not batch.is_empty) or (
                not alone and not chunk and suffix > batch.token_budget):
            return False
        kv_lens, kv_ranks = plan.kv_lens or plan.chunk_lens, plan.kv_ranks or range(self.sp_size)
        plan = replace(plan, start=prefix.num_tokens)
        if chunk > 0 and not plan.kv_lens:
            plan = replace(plan, slices=slice_prompt(suffix, group, self.sp_size, chunk,
                                                     manager.block_size))
            lens = [n for row in plan.slices for n in row if n]
            ranks = [r for row in plan.slices for r, n in enumerate(row) if n]
            if manager.allocate_ranges(request.request_id, lens, ranks, group, prefix,
                                       request.num_tokens) is None:
                return False
        elif manager.allocate_prefill(request.request_id, kv_lens, kv_ranks, prefix=prefix,
                                      num_prompt_tokens=request.num_tokens) is None:
            return False
        holders = [r for n, r in zip(kv_lens, kv_ranks, strict=True) if n]
        self._start(request, leader=self.least_busy_leader(holders))
        self._start_from(request, prefix.num_tokens)
        self._sp_prefills[request.request_id] = plan
        num_tokens = sum(plan.slice_at(prefix.num_tokens))
        if alone:
            batch.token_budget = num_tokens  # NOTE: an SP prefill is a whole iteration
        elif num_tokens > batch.token_budget:
            batch.token_budget = num_tokens  # a slice's size is its own budget
        batch.add(request, num_tokens)
        return True

    def schedule_sp_slice(self, request: Request, batch: BatchBuilder) -> bool:
        """Schedule the next slice of a chunked SP prefill in flight (its size is its own
        budget: decodes then ride in the same step)."""
        plan = self._sp_prefills[request.request_id]
        num_tokens = sum(plan.slice_at(request.num_computed_tokens))
        batch.token_budget = max(batch.token_budget, num_tokens)
        batch.add(request, num_tokens)
        return True

    def consolidate(self, request: Request, batch: BatchBuilder, target: int) -> bool:
        """Move the request's KV onto `target` at the end of this step (its last SP slice is in
        the batch): the step carries the moves, and once it is booked the request decodes
        there alone, led by it. False (nothing changes) when target cannot take it."""
        moves = self.kv_cache_manager.plan_moves(request.request_id, target)
        if not moves:
            return False
        batch.kv_moves.extend(moves)
        return True

    def apply_moves(self, moves) -> None:
        """A step with KV moves is over: their requests now live (and are led) on the target."""
        manager = self.kv_cache_manager
        for request_id in dict.fromkeys(m.request_id for m in moves):
            pending = manager.pending_moves(request_id)
            if pending and manager.placement(request_id) is not None:
                manager.apply_moves(request_id)
                self._leaders[request_id] = pending[0].dst.rank

    def sp_prefill_plan(self, request_id: str) -> SpPrefillSchedule | None:
        """The SP prefill plan of a request still prefilling over a group, else None."""
        return self._sp_prefills.get(request_id)

    def leader_of(self, request_id: str) -> int:
        """The SP rank leading a placed request (0 when not placed)."""
        return self._leaders.get(request_id, 0)

    def set_leader(self, request_id: str, rank: int) -> None:
        """Hand a decoding request's mastership to another rank (loongserve's rebalancing)."""
        if request_id not in self._leaders or not 0 <= rank < self.sp_size:
            raise ValueError(f"cannot make rank {rank} lead {request_id!r}")
        self._leaders[request_id] = rank

    def least_busy_leader(self, ranks: list[int]) -> int:
        """The rank of `ranks` leading the fewest requests (ties: the highest rank)."""
        counts = [0] * self.sp_size
        for rank in self._leaders.values():
            counts[rank] += 1
        return min(ranks, key=lambda r: (counts[r], -r))

    def admit_local(self, request: Request, batch: BatchBuilder, rank: int | None = None,
                    chunked: bool = True, spill: bool = False) -> bool:
        """Admit the waiting head onto one SP rank (default: the one with the most free blocks),
        which leads it and holds all its prompt KV, and schedule its first chunk (or, unchunked,
        its whole prompt). With `spill` its decode KV moves onto another rank of the SP group
        once its rank runs out of blocks (loongserve's scale-up); else it stays on that rank."""
        manager = self.kv_cache_manager
        if rank is None:
            rank = max(range(self.sp_size), key=lambda r: (manager.pools[r].num_free_blocks, -r))
        prefix = self.cached_prefix(request, ranks=[rank])
        suffix = request.num_tokens - prefix.num_tokens
        if manager.prefix_cache.is_pending(request, prefix) or (
                not chunked and suffix > batch.token_budget):
            return False
        others = [r for r in range(self.sp_size) if r != rank] if spill else []
        lens, ranks = [suffix] + [0] * len(others), [rank] + others
        if manager.allocate_prefill(request.request_id, lens, ranks, sticky=spill,
                                    prefix=prefix, num_prompt_tokens=request.num_tokens) is None:
            return False
        self._start(request, leader=rank)
        self._start_from(request, prefix.num_tokens)
        return self.schedule_prefill(request, batch, chunked=chunked)

    def cached_prefix(self, request: Request, ranks: list[int] | None = None) -> CachedPrefix:
        """The request's longest cached prefix on `ranks` (default: any rank; nothing held).
        None for a request asking for prompt logprobs: every prompt position must be computed
        to be scored (vLLM's rule); its blocks are still cached for others."""
        if request.sampling_params.prompt_logprobs is not None:
            return NO_PREFIX
        return self.kv_cache_manager.find_cached_prefix(request, request.num_tokens, ranks)

    def _start(self, request: Request, leader: int) -> None:
        if self.waiting[0] is request:
            self.waiting.popleft()
        else:  # loongserve admits a planned batch, not only the head
            self.waiting.remove(request)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        self._leaders[request.request_id] = leader

    def _add_placement(self, scheduled: ScheduledRequest) -> None:
        """Fill the SP fields: where the KV lives, who leads, and an SP prefill's chunks."""
        placement = self.kv_cache_manager.placement(scheduled.request_id)
        scheduled.kv_ranges = placement.ranges
        scheduled.leader = self._leaders[scheduled.request_id]
        plan = self._sp_prefills.get(scheduled.request_id)
        if plan is not None:
            lens = plan.slice_at(scheduled.num_computed_tokens)
            scheduled.sp_chunk_lens = lens
            if plan.slices:  # the KV after this slice: later slices' ranges are not written yet
                scheduled.kv_ranges = truncate_ranges(
                    placement.ranges, scheduled.num_computed_tokens + sum(lens),
                    self.kv_cache_manager.block_size)
            # the last computing rank holds the last token: it samples the first
            scheduled.leader = max(r for r, n in enumerate(lens) if n)
            group_size = sum(1 for n in lens if n)
            scheduled.sp_attention = (plan.sp_attention or self.sp_attention).for_group(
                group_size)
            if not scheduled.sp_attention.is_exact:  # its KV is not exact attention's
                self.kv_cache_manager.prefix_cache.mark_uncacheable(scheduled.request_id)
        elif len(placement.ranks) == 1:  # all on the leader: a plain block table there
            scheduled.block_ids = [b for r in placement.ranges for b in r.block_ids]


def truncate_ranges(ranges: tuple[TokenRange, ...], end: int,
                    block_size: int) -> tuple[TokenRange, ...]:
    """The ranges covering positions [0, end), the last one cut at `end`."""
    kept = []
    for held in ranges:
        if held.start >= end:
            break
        if held.end > end:
            held = TokenRange(held.rank, held.start, end,
                              held.block_ids[:cdiv(end - held.start, block_size)])
        kept.append(held)
    return tuple(kept)
