"""The scheduler's step books, mixed into Scheduler: which instances run which step, the
requests in flight, a long prompt's reservation, and what each instance still has to be told
(finished and preempted requests). No torch.

`schedule_steps()` is asked whenever instances become free and returns new steps for them;
`update_from_step()` books a finished step. A policy that is not `concurrent` (sarathi, vllm,
loongserve, sps2 with --lockstep) runs one step over every instance at a time: exactly the
lock-step iteration of `schedule()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csps.contract.step import RunnerOutput, SchedulerOutput, Step
from csps.scheduler.batch import BatchBuilder
from csps.scheduler.instances import InstanceView, components, hull

if TYPE_CHECKING:
    from csps.scheduler.scheduler import RequestUpdate


class StepBooks:
    """Needs the Scheduler's policy, running/waiting queues, kv_cache_manager, _leaders,
    is_distributed, sp_size, schedule(), _emit() and update_from_output()."""

    def _init_steps(self, num_instances: int | None = None) -> None:
        self._num_instances = num_instances
        self._steps: dict[int, Step] = {}  # in flight, by step id
        self._busy: dict[int, int] = {}  # instance -> the step id running on it
        self.in_flight_ids: set[str] = set()  # requests some running step holds
        self.reserved: tuple[int, ...] | None = None  # a waiting long prompt's SP group
        self._reserved_for: str | None = None
        # a policy that plans out of order (loongserve): one group per planned request
        self.reservations: dict[str, tuple[int, ...]] = {}
        self._step_id = 0
        self._notices: list[tuple[list[str], list[str]]] = []  # per instance: finished, preempted

    @property
    def num_instances(self) -> int:
        return self._num_instances or self.sp_size

    @property
    def steps_in_flight(self) -> list[Step]:
        return list(self._steps.values())

    def is_in_flight(self, request_id: str) -> bool:
        """True while a step that holds the request has not ended."""
        return request_id in self.in_flight_ids

    def reserve(self, group) -> None:
        """Keep `group`'s instances from new steps until all are free, for the waiting head
        (a long prompt) whose SP group it is."""
        self.reserved, self._reserved_for = tuple(group), self.waiting[0].request_id

    def release_reservation(self, request_id: str) -> None:
        """The request reserved for is admitted (or gone): its group is free again."""
        if self._reserved_for == request_id:
            self.reserved = self._reserved_for = None
        self.reservations.pop(request_id, None)

    @property
    def reserved_instances(self) -> set[int]:
        """Every instance some reservation holds."""
        held = set(self.reserved or ())
        for group in self.reservations.values():
            held.update(group)
        return held

    def span_of(self, request_id: str) -> tuple[int, ...]:
        """The contiguous instances a placed request's work touches (all of them unplaced)."""
        if not self.is_distributed:
            return (0,)
        manager = self.kv_cache_manager
        placement = manager.placement(request_id)
        if placement is None:
            return tuple(range(self.sp_size))
        ranks = set(manager.group(request_id)) | set(placement.ranks)
        ranks.add(self._leaders.get(request_id, placement.ranks[0]))
        return hull(ranks)

    # ---- notices: what each instance's workers must drop --------------------------------------
    def _notify(self, finished: str | None = None, preempted: str | None = None) -> None:
        if not self._notices:
            self._notices = [([], []) for _ in range(self.num_instances)]
        for fin, pre in self._notices:
            if finished is not None:
                fin.append(finished)
            if preempted is not None:
                pre.append(preempted)

    def _take_notices(self, instances: tuple[int, ...]) -> tuple[list[str], list[str]]:
        """The finished and preempted request ids not yet told to these instances."""
        if not self._notices:
            return [], []
        finished, preempted = [], []
        for i in instances:
            fin, pre = self._notices[i]
            finished += [r for r in fin if r not in finished]
            preempted += [r for r in pre if r not in preempted]
            fin.clear()
            pre.clear()
        return finished, preempted

    # ---- steps -----------------------------------------------------------------------------
    def schedule_steps(self) -> list[Step]:
        """New steps for the instances free now (none while a lock-step step runs)."""
        if not (self.is_distributed and getattr(self.policy, "concurrent", False)):
            if self._steps:
                return []
            output = self.schedule()
            everyone = tuple(range(self.num_instances))
            return [] if output.is_empty else [self._launch(everyone, output)]
        if self._reserved_for is not None and (
                not self.waiting or self.waiting[0].request_id != self._reserved_for):
            self.reserved = self._reserved_for = None
        waiting = {r.request_id for r in self.waiting}
        for request_id in [r for r in self.reservations if r not in waiting]:
            del self.reservations[request_id]
        self._reserve_for_head()
        replans = getattr(self.policy, "replans_each_step", False)
        steps, tried = [], set()
        while (instances := self._next_free(tried)) is not None:
            tried.add(instances)
            batch = BatchBuilder(self.token_budget)
            self.policy.schedule_step(InstanceView(self, instances), batch)
            if not batch.is_empty:
                steps.append(self._launch(instances, self._emit(batch, instances)))
            if replans and not batch.is_empty:  # loongserve: plan the next head on the rest
                self._reserve_for_head()
        return steps

    def _reserve_for_head(self) -> None:
        """Reserve the waiting head's group (the policy's head_group) if nothing is reserved:
        a long head's group goes first when free. A policy that plans out of order
        (plans_out_of_order) instead gets a reservation for each group it plans (its
        planned_id), beside the others, on instances no reservation holds."""
        if getattr(self.policy, "plans_out_of_order", False):
            if self.waiting:
                group = self.policy.head_group(self)
                if group is not None:
                    self.reservations[self.policy.planned_id] = hull(group)
        elif self.reserved is None and self.waiting:
            group = self.policy.head_group(self)
            if group is not None:
                self.reserved, self._reserved_for = hull(group), self.waiting[0].request_id

    def _next_free(self, tried: set[tuple[int, ...]]) -> tuple[int, ...] | None:
        """The first component (joined with the reservation) whose instances are all free."""
        spans = [self.span_of(r.request_id) for r in self.running]
        if self.reserved:
            spans.append(self.reserved)
        spans += self.reservations.values()
        for comp in components(self.sp_size, spans):
            if comp not in tried and not any(i in self._busy for i in comp):
                return comp
        return None

    def _launch(self, instances: tuple[int, ...], output: SchedulerOutput) -> Step:
        self._step_id += 1
        step = Step(self._step_id, instances, output)
        self._steps[step.step_id] = step
        for i in instances:
            self._busy[i] = step.step_id
        self.in_flight_ids.update(r.request_id for r in output.scheduled_requests)
        return step

    def update_from_step(self, step: Step, runner_output: RunnerOutput) -> list[RequestUpdate]:
        """Book a finished step: free its instances, then update its requests."""
        del self._steps[step.step_id]
        for i in step.instances:
            self._busy.pop(i, None)
        self.in_flight_ids.difference_update(
            r.request_id for r in step.scheduler_output.scheduled_requests)
        updates = self.update_from_output(step.scheduler_output, runner_output)
        if step.scheduler_output.kv_moves:  # the copies are done: point the books at them
            self.apply_moves(step.scheduler_output.kv_moves)
        return updates
