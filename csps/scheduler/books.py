"""SchedulerBooks: the narrow interface policies are written against (no torch, no Scheduler).

A policy reads the queues and the KV pools and acts only through these verbs; the Scheduler
(scheduler.py with its SP and step books) implements them. Policies import this module for
their annotations alone, so nothing in a policy depends on Scheduler's internals, and the
Scheduler can build its policy (policies.py) without an import circle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from csps.config import SchedulerConfig
    from csps.kvcache.placement import DistributedKVCacheManager
    from csps.kvcache.prefix_cache import CachedPrefix
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.predictor import StepPredictor
    from csps.scheduler.sp_books import SpPrefillSchedule


class SchedulerBooks(Protocol):
    config: SchedulerConfig
    waiting: deque[Request]  # FCFS; the head is waiting[0]
    running: list[Request]  # in admission order: the last is the newest
    kv_cache_manager: DistributedKVCacheManager  # per-rank pools (the KV-placing policies)
    max_model_len: int
    token_budget: int  # --max-num-batched-tokens, resolved
    predictor: StepPredictor | None

    @property
    def can_run_more(self) -> bool: ...  # under --max-num-seqs

    @property
    def sp_size(self) -> int: ...

    @property
    def rank_capacity_tokens(self) -> int: ...  # tokens one rank's empty pool holds

    # ---- acting on one step's batch ------------------------------------------------------
    def schedule_decode(self, request: Request, batch: BatchBuilder) -> bool: ...
    def schedule_prefill(self, request: Request, batch: BatchBuilder, chunked: bool) -> bool: ...
    def admit(self, request: Request, batch: BatchBuilder, chunked: bool) -> bool: ...
    def admit_local(self, request: Request, batch: BatchBuilder, rank: int | None = None,
                    chunked: bool = True, spill: bool = False) -> bool: ...
    def admit_sequence_parallel(self, request: Request, batch: BatchBuilder,
                                plan: SpPrefillSchedule | None = None, alone: bool = True,
                                chunk: int = 0) -> bool: ...
    def schedule_sp_slice(self, request: Request, batch: BatchBuilder) -> bool: ...
    def consolidate(self, request: Request, batch: BatchBuilder, target: int) -> bool: ...
    def preempt(self, request: Request, batch: BatchBuilder) -> None: ...

    # ---- SP placement ----------------------------------------------------------------------
    def sp_prefill_plan(self, request_id: str) -> SpPrefillSchedule | None: ...
    def cached_prefix(self, request: Request,
                      ranks: list[int] | None = None) -> CachedPrefix: ...  # not held
    def leader_of(self, request_id: str) -> int: ...
    def set_leader(self, request_id: str, rank: int) -> None: ...
    def least_busy_leader(self, ranks: list[int]) -> int: ...

    # ---- per-instance steps ------------------------------------------------------------------
    def span_of(self, request_id: str) -> tuple[int, ...]: ...  # instances it touches
    def is_in_flight(self, request_id: str) -> bool: ...  # in a step that has not ended
    def reserve(self, group: Sequence[int]) -> None: ...  # for the waiting head
    def release_reservation(self, request_id: str) -> None: ...
    reservations: dict[str, tuple[int, ...]]  # plans_out_of_order: planned request -> group

    @property
    def reserved_instances(self) -> set[int]: ...  # held by any reservation
