"""Scheduling policies: which requests run next iteration, and how many tokens each. No torch.

A policy only decides; it calls the scheduler's helpers (`schedule_decode`, `schedule_prefill`,
`admit`) that do the KV bookkeeping. Policies (algorithms.md section 3):
- `sarathi`: chunked prefill with stall-free hybrid batching (Sarathi-Serve).
- `vllm`: prefill-first without chunking (the classic reference).
- `sps2`: CSPS (algorithms.md §2), sps2.py: chunked SP prefill of long prompts on per-instance
  steps; with a cost model each long prompt's SP configuration comes from configurator.py.
- `loongserve`: elastic sequence parallelism (loongserve.py).
policies.py builds the one a SchedulerConfig names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.books import SchedulerBooks


class SchedulingPolicy(Protocol):
    name: str
    chunks_prefill: bool  # False: a prompt must fit the token budget whole

    def schedule(self, scheduler: SchedulerBooks, batch: BatchBuilder) -> None:
        """Fill `batch` with this iteration's work through the scheduler's helpers."""


class SarathiPolicy:
    """Running decodes first (1 token each), then the next chunks of prefills in flight, then new
    prefills FCFS while the token budget and KV allow. A new request reserves KV for its whole
    prompt at admission; when a decode cannot get a slot, the newest request is preempted."""

    name = "sarathi"
    chunks_prefill = True

    def schedule(self, scheduler: SchedulerBooks, batch: BatchBuilder) -> None:
        for request in list(scheduler.running):
            if not request.is_prefill and request in scheduler.running:
                if not scheduler.schedule_decode(request, batch):
                    break
        for request in scheduler.running:
            if request.is_prefill and batch.token_budget > 0 and request not in batch:
                scheduler.schedule_prefill(request, batch, chunked=True)
        while scheduler.waiting and batch.token_budget > 0 and scheduler.can_run_more:
            if not scheduler.admit(scheduler.waiting[0], batch, chunked=True):
                break


class VllmPolicy:
    """Prefill-first: when waiting prompts fit (whole, within the budget and KV), the iteration
    runs only prefills; otherwise it runs one decode step of every running request."""

    name = "vllm"
    chunks_prefill = False

    def schedule(self, scheduler: SchedulerBooks, batch: BatchBuilder) -> None:
        while scheduler.waiting and scheduler.can_run_more:
            if not scheduler.admit(scheduler.waiting[0], batch, chunked=False):
                break
        if not batch.is_empty:
            return
        for request in list(scheduler.running):
            if request in scheduler.running and not scheduler.schedule_decode(request, batch):
                break
