"""Scheduling policies: which requests run next iteration, and how many tokens each. No torch.

A policy only decides; it calls the scheduler's helpers (`schedule_decode`, `schedule_prefill`,
`admit`) that do the KV bookkeeping. Policies (algorithms.md section 3):
- `sarathi`: chunked prefill with stall-free hybrid batching (Sarathi-Serve).
- `vllm`: prefill-first without chunking (the classic reference).
- `sps2`: CSPS (algorithms.md §2): SP prefill of long prompts, decode separate from prefill;
  with a cost model each long prompt's SP configuration comes from configurator.py.
- `loongserve`: elastic sequence parallelism (loongserve.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from csps.config import SchedulerConfig
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.configurator import Sps2Configurator
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


class Sps2Policy:
    """CSPS on an SP group (needs a DistributedKVCacheManager).

    Iterations are either prefill or decode, never both (algorithms.md §2.4). A prefill
    iteration runs the in-flight chunks of short prompts (each on the rank it was placed on,
    under the token budget) plus newly admitted short prompts; or, when none is in flight and
    the waiting head has at least `long_prompt_threshold` tokens (or more than one rank's KV
    pool holds), that one prompt prefilled whole over the SP group. A decode iteration runs one
    token of every decoding request; for a request whose KV spans ranks the query moves to
    the KV. While both kinds have work they
    alternate, so a decode waits at most one prefill iteration (one SP prefill or one budget of
    chunks) and TBT stays flat while long prompts arrive. With `hybrid_batching` the chunks ride
    in the decode iterations instead (Sarathi-Serve's rule), kept for comparison; an SP prefill
    still runs alone.
    """

    name = "sps2"
    chunks_prefill = True

    def __init__(self, long_prompt_threshold: int = 1024, hybrid_batching: bool = False,
                 configurator: Sps2Configurator | None = None) -> None:
        self.long_prompt_threshold = long_prompt_threshold
        self.hybrid_batching = hybrid_batching
        self.configurator = configurator  # None: a long prompt prefills over the whole group
        self._last_was_prefill = False

    def schedule(self, scheduler: Scheduler, batch: BatchBuilder) -> None:
        if self.hybrid_batching:  # Sarathi-style: decodes, then chunks in the same iteration
            if scheduler.waiting and self._goes_sp(scheduler, scheduler.waiting[0]) and not any(
                    r.is_prefill for r in scheduler.running):
                self._schedule_prefills(scheduler, batch)  # an SP prefill runs alone
            if batch.is_empty:
                self._schedule_decodes(scheduler, batch)
                self._schedule_prefills(scheduler, batch)
            return
        has_decodes = any(not r.is_prefill for r in scheduler.running)
        if not (has_decodes and self._last_was_prefill):
            self._schedule_prefills(scheduler, batch)
        self._last_was_prefill = not batch.is_empty
        if batch.is_empty:
            self._schedule_decodes(scheduler, batch)

    def _schedule_decodes(self, scheduler: Scheduler, batch: BatchBuilder) -> None:
        for request in list(scheduler.running):
            if (request in scheduler.running and not request.is_prefill
                    and not scheduler.schedule_decode(request, batch)):
                break

    def _schedule_prefills(self, scheduler: Scheduler, batch: BatchBuilder) -> None:
        for request in scheduler.running:
            if request.is_prefill and batch.token_budget > 0:
                scheduler.schedule_prefill(request, batch, chunked=True)
        while scheduler.waiting and batch.token_budget > 0 and scheduler.can_run_more:
            head = scheduler.waiting[0]
            if self._goes_sp(scheduler, head) and self.configurator is None:
                if batch.is_empty:
                    scheduler.admit_sequence_parallel(head, batch)
                break
            if self._goes_sp(scheduler, head):
                if not self._admit_configured(scheduler, head, batch):
                    break
            elif not scheduler.admit_local(head, batch):
                break

    def _admit_configured(self, scheduler: Scheduler, request: Request,
                          batch: BatchBuilder) -> bool:
        """A long prompt as the configurator says: an SP prefill over its chosen group (alone
        in an empty iteration), or the local chunked path on its chosen rank."""
        choice = self.configurator.choose(scheduler, request)
        if choice is None:
            return False
        if choice.degree == 1:
            return scheduler.admit_local(request, batch, rank=choice.ranks[0])
        if batch.is_empty:
            scheduler.admit_sequence_parallel(request, batch, choice.plan)
        return False  # an SP prefill ends the iteration's admissions

    def _goes_sp(self, scheduler: Scheduler, request: Request) -> bool:
        """Long enough for an SP prefill. NOTE: a prompt one rank cannot hold goes SP whatever
        the threshold."""
        threshold = min(self.long_prompt_threshold, scheduler.rank_capacity_tokens + 1)
        return scheduler.sp_size > 1 and request.num_tokens >= max(threshold, scheduler.sp_size)


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

        configurator = None if predictor is None else Sps2Configurator(
            predictor, allowed_degrees, config.sps2_csa_candidates,
            config.sps2_micro_batch_candidates)
        return Sps2Policy(config.long_prompt_threshold, config.hybrid_batching, configurator)
    if config.policy == "loongserve":
        from csps.scheduler.loongserve import LoongServePolicy

        return LoongServePolicy(predictor, allowed_degrees, config.loongserve_sp_batch)
    raise ValueError(f"unknown scheduler policy {config.policy!r}; choose from {POLICIES}")
