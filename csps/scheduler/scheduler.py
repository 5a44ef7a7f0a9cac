"""Scheduler: owns the waiting and running queues and the KV bookkeeping, and emits one
SchedulerOutput per iteration. The chosen policy decides; this class keeps the books. No torch.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from csps.config import SchedulerConfig
from csps.contract.sp_attention import SpAttention
from csps.contract.step import RunnerOutput, ScheduledRequest, SchedulerOutput
from csps.kvcache.kv_cache_manager import KVCacheManager
from csps.kvcache.placement import DistributedKVCacheManager
from csps.kvcache.prefix_cache import PrefixCacheStats
from csps.request import Request, RequestStatus
from csps.scheduler.batch import BatchBuilder
from csps.scheduler.policies import make_policy
from csps.scheduler.sampling_context import sampling_context
from csps.scheduler.sp_books import SequenceParallelBooks, SpPrefillSchedule
from csps.scheduler.step_books import StepBooks

if TYPE_CHECKING:
    from csps.scheduler.predictor import StepPredictor

logger = logging.getLogger(__name__)


@dataclass
class RequestUpdate:
    """What one iteration did to a request: tokens it gained and whether it finished."""

    request: Request
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    stop_reason: int | None = None  # the stop token id that ended it, if any


class Scheduler(SequenceParallelBooks, StepBooks):
    def __init__(self, config: SchedulerConfig,
                 kv_cache_manager: KVCacheManager | DistributedKVCacheManager,
                 max_model_len: int, predictor: StepPredictor | None = None,
                 allowed_sp_degrees: Sequence[int] | None = None,
                 num_instances: int | None = None,
                 sp_attention: SpAttention | None = None) -> None:
        """predictor: prices candidate iterations for the policies that plan with a cost model
        (sps2's configurator, loongserve). allowed_sp_degrees: SP prefill group sizes the
        workers can run; default {1, P} (an SP prefill spans the whole group; 1 = a rank's
        local prefill); the simulator may allow any of 1..P. num_instances: the SP ranks a
        lock-step step spans (default: the KV manager's ranks; more when a policy that keeps
        one pool runs over several SP ranks). sp_attention: the deployment's SP attention
        (ParallelConfig.sp_attention_choice; default Ulysses), put on every SP prefill whose
        policy chose none."""
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.max_model_len = max_model_len
        self.token_budget = config.token_budget(max_model_len)
        self.predictor = predictor
        self.sp_attention = sp_attention or SpAttention()
        self.policy = make_policy(config, predictor, allowed_sp_degrees)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the newest
        self.requests: dict[str, Request] = {}
        self._iteration = 0
        self.num_preemptions = 0  # total since start (vLLM's num_preemptions_total)
        # Sequence parallelism (a DistributedKVCacheManager): each placed request's leader,
        # the SP rank that runs its tokens, and this iteration's SP prefills.
        self._leaders: dict[str, int] = {}
        self._sp_prefills: dict[str, SpPrefillSchedule] = {}  # requests prefilling over a group
        self._init_steps(num_instances)

    # ---- queue management -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not self.policy.chunks_prefill and request.num_tokens > self.token_budget:
            raise ValueError(f"prompt of {request.num_tokens} tokens exceeds the "
                             f"{self.token_budget}-token budget of the {self.config.policy} policy")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        """Finish the given requests as aborted and free their KV; unknown ids are ignored."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.is_finished:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache_manager.free(request.request_id)
        self._leaders.pop(request.request_id, None)
        self._sp_prefills.pop(request.request_id, None)
        del self.requests[request.request_id]
        self._notify(finished=request.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def can_run_more(self) -> bool:
        return len(self.running) < self.config.max_num_seqs

    # ---- helpers the policies call ----------------------------------------------------------
    def schedule_decode(self, request: Request, batch: BatchBuilder) -> bool:
        """Schedule one decode token, preempting the newest requests if KV runs out. False if
        the request itself had to be preempted or the budget is spent."""
        if batch.token_budget < 1:
            return False
        while not self.kv_cache_manager.allocate_slots(request.request_id, request.num_tokens):
            victim = self.running[-1]
            self.preempt(victim, batch)
            if victim is request:
                return False
        batch.add(request, 1)
        return True

    def schedule_prefill(self, request: Request, batch: BatchBuilder, chunked: bool) -> bool:
        """Schedule the next prefill chunk of a request whose KV is already reserved."""
        remaining = request.num_tokens - request.num_computed_tokens
        num_tokens = min(remaining, batch.token_budget) if chunked else remaining
        if num_tokens < 1 or num_tokens > batch.token_budget:
            return False
        batch.add(request, num_tokens)
        return True

    def admit(self, request: Request, batch: BatchBuilder, chunked: bool) -> bool:
        """Move the head of the waiting queue to running, reserving KV for all its known tokens
        and starting from its cached prefix (its first uncached token is computed first)."""
        manager = self.kv_cache_manager
        prefix = self.cached_prefix(request)
        if manager.prefix_cache.is_pending(request, prefix) or (
                not chunked and request.num_tokens - prefix.num_tokens > batch.token_budget):
            return False  # (waiting for a prefix another request is computing)
        if not manager.allocate_slots(request.request_id, request.num_tokens, prefix,
                                      num_prompt_tokens=request.num_tokens):
            return False
        self.waiting.popleft()
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        self._start_from(request, prefix.num_tokens)
        return self.schedule_prefill(request, batch, chunked)

    def _start_from(self, request: Request, num_cached_tokens: int) -> None:
        """An admitted request's KV holds its cached prefix: computing starts after it."""
        request.num_computed_tokens = num_cached_tokens
        self.kv_cache_manager.prefix_cache.expect(request, num_cached_tokens)
        if not request.num_preemptions:  # vLLM reports the first admission's hit
            request.num_cached_tokens = num_cached_tokens

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in and found in the prefix cache since start."""
        return self.kv_cache_manager.prefix_cache.stats

    def preempt(self, request: Request, batch: BatchBuilder) -> None:
        """Preempt by recompute: free the KV and requeue at the front of the waiting queue."""
        self.running.remove(request)
        batch.remove(request)
        self.kv_cache_manager.free(request.request_id)
        self._leaders.pop(request.request_id, None)
        self._sp_prefills.pop(request.request_id, None)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self._notify(preempted=request.request_id)
        logger.info("request %s preempted: KV cache full, it will be recomputed (%d time(s) "
                    "for this request, %d in total)", request.request_id,
                    request.num_preemptions, self.num_preemptions)

    # ---- the iteration ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """One lock-step iteration over every instance (the policy's `schedule`)."""
        batch = BatchBuilder(self.token_budget)
        self.policy.schedule(self, batch)
        output = self._emit(batch, tuple(range(self.num_instances)))
        for request_id, plan in list(self._sp_prefills.items()):
            if not plan.slices:  # a whole-prompt SP prefill is one iteration
                del self._sp_prefills[request_id]
        return output

    def _emit(self, batch: BatchBuilder, instances: tuple[int, ...]) -> SchedulerOutput:
        """The SchedulerOutput of a built batch (decodes first), with what `instances` must
        still be told."""
        self._iteration += 1
        decodes = [(r, n) for r, n in batch.entries if not r.is_prefill]
        prefills = [(r, n) for r, n in batch.entries if r.is_prefill]
        finished, preempted = self._take_notices(instances)
        return SchedulerOutput(
            iteration=self._iteration,
            scheduled_requests=[self._to_scheduled(r, n) for r, n in decodes + prefills],
            finished_request_ids=finished,
            preempted_request_ids=preempted,
            kv_moves=list(batch.kv_moves),
        )

    def _to_scheduled(self, request: Request, num_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        do_sample = start + num_tokens == request.num_tokens
        scheduled = ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids_between(start, start + num_tokens),
            num_computed_tokens=start,
            block_ids=[],
            sampling_params=request.sampling_params,
            do_sample=do_sample,
            sampling_context=sampling_context(request, start, num_tokens, do_sample),
        )
        if self.is_distributed:
            self._add_placement(scheduled)
        else:
            scheduled.block_ids = list(self.kv_cache_manager.block_ids(request.request_id))
        return scheduled

    def update_from_output(self, output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[RequestUpdate]:
        """Advance counters, append sampled tokens, and finish requests that hit a stop rule."""
        updates = []
        for scheduled in output.scheduled_requests:
            request = self.requests.get(scheduled.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted or preempted while the iteration ran
            request.num_computed_tokens += scheduled.num_scheduled_tokens
            self.kv_cache_manager.cache_computed(request, request.num_computed_tokens)
            if scheduled.do_sample:  # its prompt (or last slice) is done
                self._sp_prefills.pop(request.request_id, None)
            token_id = runner_output.sampled_token_ids.get(scheduled.request_id)
            if not scheduled.do_sample or token_id is None:
                continue
            request.output_token_ids.append(token_id)
            update = RequestUpdate(request, [token_id])
            status, update.stop_reason = self._check_stop(request, token_id)
            if status is not None:
                self._finish(request, status)
                update.finished = True
            updates.append(update)
        return updates

    def _check_stop(self, request: Request,
                    token_id: int) -> tuple[RequestStatus | None, int | None]:
        params = request.sampling_params
        if token_id == request.eos_token_id and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if len(request.output_token_ids) >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Finish a request for a reason found outside the scheduler (a stop string)."""
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            self._finish(request, status)

    def check_invariants(self) -> None:
        """Raise if the books disagree (tests call this after every step)."""
        self.kv_cache_manager.check_invariants()
        live = {r.request_id for r in self.running} | {r.request_id for r in self.waiting}
        if live != set(self.requests):
            raise AssertionError("request registry disagrees with the queues")
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError("more running requests than max_num_seqs")
        for request in self.waiting:
            if self.kv_cache_manager.has_blocks(request.request_id):
                raise AssertionError(f"waiting request {request.request_id} holds KV blocks")
