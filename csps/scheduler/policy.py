"""Scheduling policies: which requests run next iteration, and how many tokens each. No torch.

A policy only decides; it calls the scheduler's helpers (`schedule_decode`, `schedule_prefill`,
`admit`) that do the KV bookkeeping. Policies (algorithms.md section 3):
- `sarathi`: chunked prefill with stall-free hybrid batching (Sarathi-Serve).
- `vllm`: prefill-first without chunking (the classic reference).
- `sps2`: CSPS (algorithms.md §2), sps2.py: chunked SP prefill of long prompts on per-instance
  steps; with a cost model each long prompt's SP configuration comes from configurator.py.
- `loongserve`: elastic sequence parallelism (loongserve.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from csps.config import SchedulerConfig
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.predictor import StepPredictor
    from csps.scheduler.scheduler import Scheduler


class SchedulingPolicy(Protocol):
    name: str
    chunks_prefill: bool  # False: a prompt must fit the token budget whole

    def schedule(self, scheduler: Scheduler, batch: BatchBuilder) -> None:
        """Fill `batch` with this iteration's work through the scheduler's helpers."""


class SarathiPolicy:
    """Running decodes first (1 token each), then the next chunks of prefills in flight, then new
    prefills FCFS while the token budget and KV allow. A new request reserves KV for its whole
    prompt at admission; when a decode cannot get a slot, the newest request is preempted."""

    name = "sarathi"
    chunks_prefill = True

    def schedule(self, scheduler: Scheduler, batch: BatchBuilder) -> None:
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

    def schedule(self, scheduler: Scheduler, batch: BatchBuilder) -> None:
        while scheduler.waiting and scheduler.can_run_more:
            if not scheduler.admit(scheduler.waiting[0], batch, chunked=False):
                break
        if not batch.is_empty:
            return
        for request in list(scheduler.running):
            if request in scheduler.running and not scheduler.schedule_decode(request, batch):
                break


POLICIES = ("sarathi", "vllm", "sps2", "loongserve")


def make_policy(config: SchedulerConfig, predictor: StepPredictor | None = None,
                allowed_degrees: Sequence[int] | None = None) -> SchedulingPolicy:
    """The policy config.policy names. predictor: lets sps2 configure each long prompt and
    loongserve fit its cost per degree (loongserve needs one); allowed_degrees: SP prefill
    group sizes the workers can run (default {1, P})."""
    if config.policy == "sarathi":
        return SarathiPolicy()
    if config.policy == "vllm":
        return VllmPolicy()
    if config.policy == "sps2":
        from csps.scheduler.configurator import Sps2Configurator
        from csps.scheduler.sps2 import Sps2Policy

        if config.slo_tbt is not None and predictor is None:
            raise ValueError("--slo-tbt needs a cost model to price steps (--cost-model)")
        configurator = None if predictor is None else Sps2Configurator(
            predictor, allowed_degrees, config.sps2_csa_candidates,
            config.sps2_micro_batch_candidates, slo_tbt=config.slo_tbt,
            chunk=config.sp_prefill_chunk)
        return Sps2Policy(config.long_prompt_threshold, config.hybrid_batching, configurator,
                          concurrent=not config.lockstep, sp_prefill_chunk=config.sp_prefill_chunk)
    if config.policy == "loongserve":
        from csps.scheduler.loongserve import LoongServePolicy

        return LoongServePolicy(predictor, allowed_degrees, config.loongserve_sp_batch)
    raise ValueError(f"unknown scheduler policy {config.policy!r}; choose from {POLICIES}")
