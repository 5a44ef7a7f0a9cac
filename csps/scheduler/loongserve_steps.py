"""The loongserve policy on per-instance steps (the default; `--lockstep` keeps loongserve.py's
iterations over every instance). No torch.

Whenever instances become free the scheduler asks `head_group`: the policy runs LoongServe's
global manager on the books as they are now. (1) Dispatching: the waiting requests that
LoongServe's admission test accepts, idle instances counted by KV capacity, with its bounded
out-of-order admission (loongserve_admission.py). (2) Elastic instance allocation: a
contiguous window of instances no prefill in progress and no planned group holds, from the
longest idle run, extended into decode instances while the borrowing test says so
(loongserve_windows.py). (3) Batching: the DP splits the length-sorted requests over groups of
consecutive instances of the window (loongserve_batching.py). (4) Scaling plan: the plan's
first group is reserved (a reservation per planned group, so later plans start beside it on
other instances) and, once all its instances are free, its requests start in one step:
- a one-instance group prefills its prompts whole on that instance, beside the decodes of the
  rest of the step's component;
- a larger group runs one ring SP prefill alone (the decodes bound to the group pause, as
  LoongServe's borrowed instances do), its chunks balanced for causal work
  (kvcache/causal_split.py), its KV scaled down to the fewest consecutive group instances that
  hold it plus decode headroom; that window is the request's decode group.
Every other free component runs a decode step of the requests bound to it: decodes never wait
for a prefill they are not part of. A decode whose group runs out of KV blocks scales up onto
a neighbouring instance of its component (DistributedKVCacheManager.widen_group); masters of
decodes spread over instances are rebalanced within the component (multi-master decoding).
After each step starts, the next group is planned on the instances left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from csps.scheduler.loongserve import LoongServePolicy
from csps.scheduler.loongserve_admission import sorted_by_length
from csps.scheduler.loongserve_windows import InstanceWindow, WindowPlans, choose_window
from csps.scheduler.sp_books import SpPrefillSchedule

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.books import SchedulerBooks
    from csps.scheduler.instances import InstanceView


@dataclass(frozen=True)
class PlannedGroup:
    """The waiting head's ESP group and the requests that start with it (FCFS order)."""

    head_id: str
    ranks: tuple[int, ...]
    requests: tuple[Request, ...]


class LoongServeStepsPolicy(LoongServePolicy):
    concurrent = True
    replans_each_step = True  # the scheduler asks head_group again after each step starts
    plans_out_of_order = True  # the planned group may start behind a refused head

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_num_ooe = 10  # LoongServe's default (api_server.py --max_num_ooe)
        self.balance_ring = True  # earlier ranks take longer chunks (kvcache/causal_split.py)
        self.sp_prefill_alone = True  # a worker's SP forward runs one request: a planned
        # group of several runs them one SP step after another on its instances
        self._window: InstanceWindow | None = None
        self._planned: dict[str, PlannedGroup] = {}  # by head id: groups reserved, in order
        self._last: PlannedGroup | None = None  # the group head_group planned last
        self._rest: list[PlannedGroup] = []  # the last plan's other groups, in FCFS order
        self._plan_ids: set[str] = set()  # the requests of the last plan

    @property
    def planned_id(self) -> str | None:
        """The waiting request whose group head_group reserved last (its plan's first in FCFS
        order)."""
        return None if self._last is None else self._last.head_id

    def admission_queue(self, scheduler: SchedulerBooks) -> list[Request]:
        """The waiting requests no reserved or carried-on group holds yet."""
        taken = {r.request_id for g in [*self._planned.values(), *self._rest]
                 for r in g.requests}
        return [r for r in scheduler.waiting if r.request_id not in taken]

    def fit(self, sp_size: int, max_len: int, block_size: int) -> None:
        if self.allowed_degrees is None:  # every contiguous sub-group has its process group
            self.allowed_degrees = tuple(range(1, sp_size + 1))
        super().fit(sp_size, max_len, block_size)

    # ---- the global manager: planning the waiting head ----------------------------------------
    def head_group(self, scheduler: SchedulerBooks) -> tuple[int, ...] | None:
        """Plan the next group on instances no reservation holds: the last plan's next group,
        or a new plan for the waiting requests no group holds. Each planned group is reserved
        (StepBooks.reservations) until it starts."""
        self._last = None
        for head_id in [h for h in self._planned if h not in scheduler.reservations]:
            del self._planned[head_id]  # started, or its request left the queue
        if not scheduler.waiting or not scheduler.can_run_more:
            return None
        carried = self._carry_on(scheduler)
        if carried is not None:
            return self._reserve(carried)
        if self.fits is None:
            self.fit(scheduler.sp_size, scheduler.max_model_len,
                     scheduler.kv_cache_manager.block_size)
        decodes = [r for r in scheduler.running if not r.is_prefill]
        self._window = self._choose_window(scheduler, decodes)
        if self._window is None:
            return None
        admitted = self.admit(scheduler, decodes)
        plan = self.plan(scheduler, admitted, decodes)[0] if admitted else None
        if plan is None:
            return None
        ordered, groups = sorted_by_length(admitted), []
        for group in plan.groups:
            members = {ordered[i].request_id for i in group.requests}
            requests = tuple(r for r in admitted if r.request_id in members)
            batches = [requests] if len(group.ranks) == 1 else [(r,) for r in requests]
            groups += [PlannedGroup(b[0].request_id, group.ranks, b) for b in batches]
        groups.sort(key=lambda g: admitted.index(g.requests[0]))  # the head's group first
        self._rest = groups[1:]
        self._plan_ids = {r.request_id for r in admitted}
        return self._reserve(groups[0])

    def _reserve(self, group: PlannedGroup) -> tuple[int, ...]:
        self._planned[group.head_id] = self._last = group
        return group.ranks

    def _carry_on(self, scheduler: SchedulerBooks) -> PlannedGroup | None:
        """The next group of the last plan, when it leads the waiting requests its plan did not
        pass over (out-of-order admission) and no prefill outside the plan and no other
        reservation holds its instances: the plan's groups start one after the other as their
        instances free (an SP group's requests one SP step after another), without planning
        again."""
        passed = self.skipped_ids | self._plan_ids | {
            r.request_id for g in self._planned.values() for r in g.requests}
        held = {i for r in scheduler.running
                if r.is_prefill and r.request_id not in self._plan_ids
                for i in scheduler.span_of(r.request_id)} | scheduler.reserved_instances
        waiting = list(scheduler.waiting)
        while self._rest:
            group = self._rest.pop(0)
            if group.requests[0] not in waiting or any(
                    r.request_id not in passed
                    for r in waiting[:waiting.index(group.requests[0])]):
                continue  # it no longer leads the requests the plan did not pass over
            if not held & set(group.ranks) and all(r in waiting for r in group.requests):
                return group
        self._rest = []
        return None

    def _choose_window(self, scheduler: SchedulerBooks,
                       decodes: list[Request]) -> InstanceWindow | None:
        held, bound = set(), set()  # instances of prefills / of decodes
        weight = dict.fromkeys(range(scheduler.sp_size), 0.0)
        for request in scheduler.running:
            span = scheduler.span_of(request.request_id)
            (held if request.is_prefill else bound).update(span)
            for rank in span:
                weight[rank] += 1 / request.num_tokens
        held |= scheduler.reserved_instances  # other planned groups wait for these
        candidates = [i for i in range(scheduler.sp_size) if i not in held]
        pools = scheduler.kv_cache_manager.pools
        return choose_window(candidates, [i for i in candidates if i not in bound],
                             weight.get, lambda i: pools[i].num_free_blocks)

    # the admission and borrowing tests of loongserve_admission.py, on the window
    def admission_budget(self, scheduler: SchedulerBooks) -> int:
        """Every group is a step of its own, each under the token budget (the DP's limit)."""
        return scheduler.token_budget * scheduler.sp_size

    def idle_ranks(self, scheduler: SchedulerBooks, decodes: list[Request]) -> list[int]:
        return list(self._window.base)

    def rank_order(self, scheduler: SchedulerBooks, decodes: list[Request]) -> list[int]:
        return list(self._window.order)

    def idle_capacity(self, scheduler: SchedulerBooks, idle: list[int]) -> int:
        """LoongServe's idle count (req_queue.py generate_new_req_list): the window's
        instances less the fewest that could hold the KV in use on them (never fewer than the
        instances no decode uses). The prefill then borrows the decode instances it needs
        (plan()), pausing their decodes for its step; csps moves no decode KV to free them
        first."""
        pools = scheduler.kv_cache_manager.pools
        order = self._window.order
        used = sum(pools[i].num_blocks - pools[i].num_free_blocks for i in order)
        by_capacity = len(order) - -(-used // max(pools[i].num_blocks for i in order))
        return max(len(idle), by_capacity)

    def _plans(self, scheduler: SchedulerBooks, requests: list[Request],
               order: list[int]) -> WindowPlans:
        return WindowPlans(self, scheduler, requests, self._window)

    def _ranks_of(self, scheduler: SchedulerBooks, request: Request) -> set[int]:
        return set(scheduler.span_of(request.request_id))

    # ---- one step on a free component ---------------------------------------------------------
    def schedule_step(self, view: InstanceView, batch: BatchBuilder) -> None:
        scheduler, paused = view.scheduler, set()
        ready = [g for g in self._planned.values()
                 if g.requests[0] in scheduler.waiting and set(g.ranks) <= set(view.instances)]
        if ready:  # the first planned group whose instances are all free now
            planned = ready[0]
            del self._planned[planned.head_id]  # started or not, it is planned afresh
            scheduler.release_reservation(planned.head_id)
            if self._start_group(view, batch, planned):
                if len(planned.ranks) > 1:
                    return  # an SP prefill runs alone: the group's decodes are paused
                paused = set(planned.ranks)  # the instance prefills this step
        decodes = [r for r in view.running if not r.is_prefill and r not in batch
                   and not paused & set(scheduler.span_of(r.request_id))]
        self.rebalance_masters(scheduler, decodes)
        for request in decodes:
            if request in view.running and not self._decode(view, request, batch):
                break

    def _start_group(self, view: InstanceView, batch: BatchBuilder,
                     planned: PlannedGroup) -> bool:
        """Admit the planned requests: True when the head started."""
        scheduler = view.scheduler
        if len(planned.ranks) > 1:
            (request,) = planned.requests
            plan = self.scale_down_plan(scheduler, request, planned.ranks)
            started = scheduler.admit_sequence_parallel(request, batch, plan, alone=True)
            if started:
                view.running.append(request)
            return started
        for request in planned.requests:
            if request not in scheduler.waiting or not scheduler.admit_local(
                    request, batch, rank=planned.ranks[0], chunked=False):
                break
            view.running.append(request)
        return planned.requests[0] in batch

    def _decode(self, view: InstanceView, request: Request, batch: BatchBuilder) -> bool:
        """One decode token. A request whose decode group is out of KV blocks first scales up
        onto a neighbouring instance with free blocks (one of the view's first): one inside
        the view decodes now; one outside joins the request's component, which then decodes
        in a later step (this one skips it). False: stop scheduling decodes."""
        manager = view.scheduler.kv_cache_manager
        if not manager.allocate_slots(request.request_id, request.num_tokens):
            group = manager.group(request.request_id)
            sides = [i for i in (group[0] - 1, group[-1] + 1)
                     if 0 <= i < len(manager.pools) and manager.pools[i].num_free_blocks]
            if sides:
                rank = max(sides, key=lambda i: (i in view.instances,
                                                 manager.pools[i].num_free_blocks))
                manager.widen_group(request.request_id, rank)
                if rank not in view.instances:
                    return True
        return view.schedule_decode(request, batch)

    # ---- scale-down -------------------------------------------------------------------------
    def scale_down_plan(self, scheduler: SchedulerBooks, request: Request,
                        group) -> SpPrefillSchedule:
        """Chunks computed over the group in rank order; KV kept on the fewest consecutive
        group instances (the most free such window) whose free blocks hold the prompt plus
        headroom, filled in rank order: that window is the request's decode group."""
        manager, n = scheduler.kv_cache_manager, request.num_tokens
        members, chunk_lens = sorted(group), self.group_chunks(scheduler, n, group)
        room = {r: manager.pools[r].num_free_blocks * manager.block_size for r in members}
        need = max(self.need(scheduler, request), n)
        decoding = {i for r in scheduler.running if not r.is_prefill
                    for i in scheduler.span_of(r.request_id)}
        kept = members
        for size in range(1, len(members) + 1):
            windows = [members[i:i + size] for i in range(len(members) - size + 1)]
            fitting = [w for w in windows if sum(room[r] for r in w) >= need]
            if fitting:  # packed where decodes already run, then at the group's edge
                kept = max(fitting, key=lambda w: (len(decoding & set(w)),
                                                   w[0] == members[0] or w[-1] == members[-1],
                                                   sum(room[r] for r in w), -w[0]))
                break
        kv_lens, left = [], n
        for rank in kept:
            take = min(left, room[rank])
            kv_lens.append(take)
            left -= take
        return SpPrefillSchedule(tuple(chunk_lens), tuple(kv_lens), tuple(kept))
