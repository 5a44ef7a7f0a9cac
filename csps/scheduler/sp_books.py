"""The scheduler's sequence-parallel books (algorithms.md §2.1, §2.4), mixed into Scheduler: SP
and local admission onto a DistributedKVCacheManager, each placed request's leader, and the
placement fields of a ScheduledRequest. No torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csps.kvcache.placement import DistributedKVCacheManager, split_prompt
from csps.request import RequestStatus

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.output import ScheduledRequest


class SequenceParallelBooks:
    """Needs the Scheduler's kv_cache_manager, waiting, running, schedule_prefill, and the
    _leaders / _sp_prefills dicts it creates."""

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

    def admit_sequence_parallel(self, request: Request, batch: BatchBuilder) -> bool:
        """Admit the waiting head as an SP prefill: its prompt split over every SP rank, all of
        it in this iteration, which it takes whole. The last rank, holding the last token,
        samples its first token; its decodes are then led by the rank leading the fewest
        requests (a decode step needs only the token id, not the prefill's hidden state).
        False (nothing changes) if any rank lacks the blocks for its chunk."""
        ranks = list(range(self.sp_size))
        chunk_lens = split_prompt(request.num_tokens, len(ranks), self.kv_cache_manager.block_size)
        if min(chunk_lens) < 1 or not batch.is_empty:
            return False
        if self.kv_cache_manager.allocate_prefill(request.request_id, chunk_lens, ranks) is None:
            return False
        counts = [0] * self.sp_size
        for rank in self._leaders.values():
            counts[rank] += 1
        self._start(request, leader=min(ranks, key=lambda r: (counts[r], -r)))
        self._sp_prefills.add(request.request_id)
        batch.token_budget = request.num_tokens  # NOTE: an SP prefill is a whole iteration
        batch.add(request, request.num_tokens)
        return True

    def admit_local(self, request: Request, batch: BatchBuilder) -> bool:
        """Admit the waiting head onto the SP rank with the most free blocks (it leads the
        request and holds all its prompt KV) and schedule its first chunk."""
        manager = self.kv_cache_manager
        rank = max(range(self.sp_size), key=lambda r: (manager.pools[r].num_free_blocks, -r))
        if manager.allocate_prefill(request.request_id, [request.num_tokens], [rank]) is None:
            return False
        self._start(request, leader=rank)
        return self.schedule_prefill(request, batch, chunked=True)

    def _start(self, request: Request, leader: int) -> None:
        self.waiting.popleft()
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        self._leaders[request.request_id] = leader

    def _add_placement(self, scheduled: ScheduledRequest) -> None:
        """Fill the SP fields: where the KV lives, who leads, and an SP prefill's chunks."""
        placement = self.kv_cache_manager.placement(scheduled.request_id)
        scheduled.kv_ranges = placement.ranges
        scheduled.leader = self._leaders[scheduled.request_id]
        if scheduled.request_id in self._sp_prefills:
            scheduled.leader = self.sp_size - 1  # holds the last token: samples the first
            scheduled.sp_chunk_lens = tuple(placement.tokens_on(r)
                                            for r in range(self.sp_size))
        elif len(placement.ranks) == 1:  # all on the leader: a plain block table there
            scheduled.block_ids = [b for r in placement.ranges for b in r.block_ids]
