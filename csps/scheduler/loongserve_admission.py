"""LoongServe's admission and instance-borrowing tests (algorithms.md §3), mixed into the
loongserve policy (loongserve.py): which waiting requests this iteration prefills, on which
ranks, and which decode ranks it borrows. The policy's module docstring states the rules.
No torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csps.kvcache.kv_cache_manager import cdiv
from csps.scheduler.loongserve_batching import PrefillPlan, plan_prefill

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.books import SchedulerBooks


class LoongServeAdmission:
    """Needs the policy's predictor, fits, max_new_per_iteration, max_sp_batch and
    decode_headroom. max_num_ooe: how many rounds in a row may admit past a refused request
    (LoongServe's --max_num_ooe, 10 there; 0 here: strict FCFS unless a policy sets it)."""

    max_num_ooe = 0
    num_ooe = 0  # rounds in a row that admitted out of order
    skipped_ids: set = frozenset()

    def admit(self, scheduler: SchedulerBooks, decodes: list[Request]) -> list[Request]:
        """The FCFS prefix of the waiting queue this iteration prefills (LoongServe's test)."""
        manager, budget = scheduler.kv_cache_manager, self.admission_budget(scheduler)
        free = manager.total_free_tokens()
        wait_s = self.expected_wait(scheduler, decodes)
        idle = self.idle_ranks(scheduler, decodes)
        num_idle = self.idle_capacity(scheduler, idle)
        decode_weight = sum(1 / r.num_tokens for r in decodes)
        admitted: list[Request] = []
        borrow_weight = 0.0
        allow_ooe = self.num_ooe < self.max_num_ooe
        self.skipped_ids = set()  # refused requests the admitted ones overtook
        scan = self.admission_queue(scheduler)[
            :self.max_new_per_iteration * (8 if allow_ooe else 1)]
        for request in scan:
            if (len(admitted) >= self.max_new_per_iteration
                    or len(scheduler.running) + len(admitted) >= scheduler.config.max_num_seqs):
                break
            weight = 0.0
            trial = admitted + [request]
            plans = None
            if (sum(r.num_tokens for r in trial) <= budget
                    and sum(self.need(scheduler, r) for r in trial) <= free):
                plans = self._plans(scheduler, trial, self.rank_order(scheduler, decodes))
            if plans is not None and plans[-1] is not None:
                on_idle, on_all = plans[num_idle], plans[-1]
                if on_idle is not None:
                    ok = on_idle.time_s - on_all.time_s <= wait_s
                else:
                    weight = 1 / request.num_tokens
                    ok = on_all.time_s * decode_weight <= wait_s * (borrow_weight + weight)
            else:
                ok = False
            if not ok:
                if not allow_ooe:
                    break
                self.skipped_ids.add(request.request_id)  # LoongServe's out-of-order
                continue  # execution: a later request may go first (at most max_num_ooe rounds)
            borrow_weight += weight
            admitted.append(request)
        if admitted:
            overtook = any(scan.index(r) != i for i, r in enumerate(admitted))
            self.num_ooe = self.num_ooe + 1 if overtook else 0
        return admitted

    def plan(self, scheduler: SchedulerBooks, admitted: list[Request],
             decodes: list[Request]) -> tuple[PrefillPlan | None, set[int]]:
        """The batching plan and the decode ranks it borrows (instance-borrowing test)."""
        order = self.rank_order(scheduler, decodes)
        plans = self._plans(scheduler, admitted, order)
        j = len(self.idle_ranks(scheduler, decodes))
        while j < len(order) and plans[j] is None:
            j += 1  # the idle ranks cannot serve it: borrow until the plan fits
        while j < len(order) and plans[j] is not None and plans[j + 1] is not None:
            gain = plans[j].cost - plans[j + 1].cost
            paused = [r for r in decodes if self._touches(scheduler, r, {order[j]})]
            loss = plans[j + 1].time_s * sum(1 / r.num_tokens
                                             for r in paused)
            if gain <= loss:
                break
            j += 1
        plan = plans[min(j, len(order))]
        used = {rank for g in plan.groups for rank in g.ranks} if plan else set()
        idle = set(self.idle_ranks(scheduler, decodes))
        return plan, used - idle

    def admission_queue(self, scheduler: SchedulerBooks) -> list[Request]:
        """The waiting requests a round of admissions considers, in FCFS order."""
        return list(scheduler.waiting)

    def admission_budget(self, scheduler: SchedulerBooks) -> int:
        """Prompt tokens one round of admissions may take: one iteration's token budget."""
        return scheduler.token_budget

    def expected_wait(self, scheduler: SchedulerBooks, decodes: list[Request]) -> float:
        """Seconds until the decodes free their ranks: their mean remaining max_tokens steps
        times one predicted decode iteration (0 without decodes)."""
        if not decodes:
            return 0.0
        steps = sum(max(1, r.max_tokens - len(r.output_token_ids)) for r in decodes)
        step_s = self.predictor.decode_time([(scheduler.leader_of(r.request_id), r.num_tokens)
                                             for r in decodes])
        return steps / len(decodes) * step_s

    def idle_ranks(self, scheduler: SchedulerBooks, decodes: list[Request]) -> list[int]:
        """Ranks no decode uses (holds KV or leads), most free first."""
        busy = set()
        for request in decodes:
            busy |= self._ranks_of(scheduler, request)
        pools = scheduler.kv_cache_manager.pools
        return sorted((r for r in range(scheduler.sp_size) if r not in busy),
                      key=lambda r: (-pools[r].num_free_blocks, r))

    def idle_capacity(self, scheduler: SchedulerBooks, idle: list[int]) -> int:
        """How many instances the admission test counts as idle, given the ranks no decode
        uses: here those (the policy on per-instance steps counts KV capacity, as LoongServe
        does)."""
        return len(idle)

    def rank_order(self, scheduler: SchedulerBooks, decodes: list[Request]) -> list[int]:
        """Idle ranks (most free first), then decode ranks, cheapest to pause first."""
        idle = self.idle_ranks(scheduler, decodes)
        weight = dict.fromkeys(range(scheduler.sp_size), 0.0)
        for request in decodes:
            for rank in self._ranks_of(scheduler, request):
                weight[rank] += 1 / request.num_tokens
        pools = scheduler.kv_cache_manager.pools
        busy = sorted((r for r in range(scheduler.sp_size) if r not in idle),
                      key=lambda r: (weight[r], -pools[r].num_free_blocks, r))
        return idle + busy

    def need(self, scheduler: SchedulerBooks, request: Request) -> int:
        """KV tokens a request must find free: its prompt in blocks plus decode headroom
        (none for a request alone on an idle engine, so one that fits is never refused)."""
        block = scheduler.kv_cache_manager.block_size
        headroom = 0 if not scheduler.running else min(request.max_tokens, self.decode_headroom)
        return cdiv(request.num_tokens + headroom, block) * block

    def _plans(self, scheduler: SchedulerBooks, requests: list[Request],
               order: list[int]) -> list[PrefillPlan | None]:
        ordered = sorted_by_length(requests)
        pools, block = scheduler.kv_cache_manager.pools, scheduler.kv_cache_manager.block_size
        return plan_prefill([r.num_tokens for r in ordered],
                            [self.need(scheduler, r) for r in ordered], order,
                            lambda rank: pools[rank].num_free_blocks * block, self.fits,
                            self.max_sp_batch)

    def _ranks_of(self, scheduler: SchedulerBooks, request: Request) -> set[int]:
        placement = scheduler.kv_cache_manager.placement(request.request_id)
        return set(placement.ranks) | {scheduler.leader_of(request.request_id)}

    def _touches(self, scheduler: SchedulerBooks, request: Request, ranks) -> bool:
        return bool(ranks) and bool(self._ranks_of(scheduler, request) & set(ranks))


def sorted_by_length(requests: list[Request]) -> list[Request]:
    """Longest first (the DP's order); ties keep FCFS order."""
    return sorted(requests, key=lambda r: -r.num_tokens)
