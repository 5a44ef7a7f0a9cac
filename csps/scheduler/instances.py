"""Instances and the steps that run on them (issue 12's execution model). No torch.

An instance is one SP rank (with its TP group). A request is bound to the contiguous span of
instances its work touches: the ranks holding its KV, the rank leading it and the ranks its
KV may grow onto. Overlapping spans join into one *component*; components share nothing, so
each runs its own steps at its own pace. A step is a component's next SchedulerOutput; an
instance runs one step at a time. A long prompt whose SP group reaches beyond a free
component *reserves* the group: its instances take no new step until all of them are free,
which happens within one step of each (steps are bounded by the token budget or one slice).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from csps.scheduler.sp_books import pins_to_rank

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.books import SchedulerBooks


def hull(ranks: Iterable[int]) -> tuple[int, ...]:
    """The contiguous instances from the lowest to the highest of `ranks`."""
    ranks = list(ranks)
    return tuple(range(min(ranks), max(ranks) + 1))


def components(num_instances: int, spans: Iterable[Sequence[int]]) -> list[tuple[int, ...]]:
    """Partition instances 0..n-1 into contiguous components: overlapping spans join, every
    instance no span touches stands alone. In rank order."""
    reach = list(range(num_instances))  # reach[i]: the last instance bound to i's component
    for span in spans:
        for rank in span:
            reach[rank] = max(reach[rank], span[-1])
    out, start, end = [], 0, -1
    for rank in range(num_instances):
        end = max(end, reach[rank])
        if rank == end:
            out.append(tuple(range(start, end + 1)))
            start = rank + 1
    return out


class InstanceView:
    """A policy's window onto the scheduler for one step on `instances`: the running requests
    bound inside them that no step is running, the shared waiting queue, and admission, decode
    and preemption confined to those instances."""

    def __init__(self, scheduler: SchedulerBooks, instances: tuple[int, ...]) -> None:
        self.scheduler = scheduler
        self.instances = instances
        inside = set(instances)
        self.running: list[Request] = [
            r for r in scheduler.running
            if not scheduler.is_in_flight(r.request_id)
            and set(scheduler.span_of(r.request_id)) <= inside]

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def can_run_more(self) -> bool:
        return self.scheduler.can_run_more

    def schedule_decode(self, request: Request, batch: BatchBuilder) -> bool:
        """One decode token, preempting the newest requests of this view if KV runs out
        (their blocks are on these instances; no other step is using them)."""
        scheduler = self.scheduler
        if batch.token_budget < 1:
            return False
        while not scheduler.kv_cache_manager.allocate_slots(request.request_id,
                                                            request.num_tokens):
            victim = self.running.pop()
            scheduler.preempt(victim, batch)
            if victim is request:
                return False
        batch.add(request, 1)
        return True

    def admit_local(self, request: Request, batch: BatchBuilder, rank: int | None = None
                    ) -> bool:
        """The waiting request onto `rank` (default: `local_rank`). False (nothing changes)
        when it waits elsewhere or its KV does not fit."""
        rank = self.local_rank(request) if rank is None else rank
        if rank is None or not self.scheduler.admit_local(request, batch, rank=rank):
            return False
        self.running.append(request)
        return True

    def local_rank(self, request: Request) -> int | None:
        """Where a short waiting request goes in this view: the instance holding its cached
        prefix, else the one with the most free blocks. None while it waits for something
        outside the view, not for room in it: its prefix lies on an instance outside the view
        that has room for the rest of its prompt, or another request is computing the blocks
        after its prefix. Such a request does not hold up the ones behind it on these
        instances (each instance still admits in FCFS order)."""
        scheduler = self.scheduler
        pools, block_size = scheduler.kv_cache_manager.pools, scheduler.kv_cache_manager.block_size
        prefix = scheduler.cached_prefix(request)
        rank = max(self.instances, key=lambda r: (pools[r].num_free_blocks, -r))
        if pins_to_rank(prefix, request.num_tokens):
            holder = prefix.ranks[0]
            rest = -(-(request.num_tokens - prefix.num_tokens) // block_size)
            if holder in self.instances:
                rank = holder
            elif pools[holder].num_free_blocks >= rest:
                return None
        if scheduler.kv_cache_manager.prefix_cache.is_pending(
                request, scheduler.cached_prefix(request, ranks=[rank])):
            return None
        return rank

    def reserve(self, group: Sequence[int]) -> None:
        """Keep `group`'s instances from new steps until all are free, for the waiting head
        (a long prompt) whose SP group it is."""
        self.scheduler.reserve(group)

    def admit_sequence_parallel(self, request: Request, batch: BatchBuilder, plan, chunk: int
                                ) -> bool:
        """The waiting head as a (chunked) SP prefill over a group inside this view; its first
        slice rides with this step's decodes. Clears its reservation."""
        scheduler = self.scheduler
        chunk = chunk or request.num_tokens  # 0: the whole prompt in one slice
        if not scheduler.admit_sequence_parallel(request, batch, plan, alone=False, chunk=chunk):
            return False
        scheduler.release_reservation(request.request_id)
        self.running.append(request)
        return True
