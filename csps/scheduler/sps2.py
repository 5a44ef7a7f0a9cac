"""The sps2 policy: CSPS (algorithms.md §2) on per-instance steps (instances.py). No torch.

Concurrent (the default), per step of a free component of instances:
1. A chunked SP prefill in flight there runs its next slice (`--sp-prefill-chunk` tokens per
   rank of its group), and every decode bound to the component rides with it: a decode waits
   at most one slice.
2. Otherwise the step runs one token of every decode bound to the component, then the next
   chunks of local prefills placed on its instances (under the token budget), then admits
   waiting requests FCFS per instance: a short prompt onto the instance holding its cached
   prefix, else the component's instance with the most free blocks (one waiting for a busy
   instance outside the component lets those behind it in here); a long one (at least
   `long_prompt_threshold` tokens, or more than a rank holds) as an SP prefill over its group
   (the whole SP group, or the configurator's choice), whose first slice then rides with the
   decodes instead of local chunks. If the group reaches beyond the component, the group is
   reserved: its instances take no new step until all are free, so instances outside it keep
   serving their own requests meanwhile.
With `--consolidate-decode-kv F` the step of a long prompt's last slice also moves its KV
onto one rank of its group (kv_moves.py), where it then decodes alone, and the configurator
gives a long prompt a group no running request touches when that costs at most F times the
best group's predicted TTFT (so decodes stop riding in other prompts' slices).
With `--lockstep` it runs as before per-instance steps (`schedule`): one iteration over every
instance, prefill and decode iterations alternating, a long prompt prefilled whole and alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.batch import BatchBuilder
    from csps.scheduler.books import SchedulerBooks
    from csps.scheduler.configurator import Sps2Configurator
    from csps.scheduler.instances import InstanceView


class Sps2Policy:
    """CSPS on an SP group (needs a DistributedKVCacheManager).

    Lock-step (`schedule`): iterations are either prefill or decode, never both
    (algorithms.md §2.4). A prefill iteration runs the in-flight chunks of short prompts (each
    on the rank it was placed on, under the token budget) plus newly admitted short prompts;
    or, when none is in flight and the waiting head has at least `long_prompt_threshold`
    tokens (or more than one rank's KV pool holds), that one prompt prefilled whole over the
    SP group. A decode iteration runs one token of every decoding request; for a request whose
    KV spans ranks the query moves to the KV. While both kinds have work they alternate, so a
    decode waits at most one prefill iteration (one SP prefill or one budget of chunks). With
    `hybrid_batching` the chunks ride in the decode iterations instead (Sarathi-Serve's rule),
    kept for comparison; an SP prefill still runs alone.
    """

    name = "sps2"
    chunks_prefill = True

    def __init__(self, long_prompt_threshold: int = 1024, hybrid_batching: bool = False,
                 configurator: Sps2Configurator | None = None, concurrent: bool = False,
                 sp_prefill_chunk: int = 0, consolidate: bool = False) -> None:
        self.consolidate = consolidate and concurrent  # KV onto one rank after an SP prefill
        self.concurrent = concurrent  # per-instance steps (schedule_step); else schedule()
        self.sp_prefill_chunk = sp_prefill_chunk  # tokens per rank of a slice; 0: whole
        self.long_prompt_threshold = long_prompt_threshold
        self.hybrid_batching = hybrid_batching
        self.configurator = configurator  # None: a long prompt prefills over the whole group
        self._last_was_prefill = False

    def schedule(self, scheduler: SchedulerBooks, batch: BatchBuilder) -> None:
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

    def _schedule_decodes(self, scheduler: SchedulerBooks, batch: BatchBuilder) -> None:
        for request in list(scheduler.running):
            if (request in scheduler.running and not request.is_prefill
                    and not scheduler.schedule_decode(request, batch)):
                break

    def _schedule_prefills(self, scheduler: SchedulerBooks, batch: BatchBuilder) -> None:
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

    def _admit_configured(self, scheduler: SchedulerBooks, request: Request,
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

    def _goes_sp(self, scheduler: SchedulerBooks, request: Request) -> bool:
        """Its uncached part long enough for an SP prefill, or its cached prefix spread over
        ranks (the rest then prefills over the group, attending to it where it lies). NOTE: a
        prompt one rank cannot hold goes SP whatever the threshold."""
        if scheduler.sp_size < 2:
            return False
        prefix = scheduler.cached_prefix(request)
        if len(prefix.ranks) > 1:
            return True
        threshold = min(self.long_prompt_threshold, scheduler.rank_capacity_tokens + 1)
        if request.num_tokens > scheduler.rank_capacity_tokens:
            return True
        return request.num_tokens - prefix.num_tokens >= max(threshold, scheduler.sp_size)

    # ---- per-instance steps ------------------------------------------------------------------
    def schedule_step(self, view: InstanceView, batch: BatchBuilder) -> None:
        scheduler = view.scheduler
        batch.token_budget = max(batch.token_budget, len(view.running))  # every decode rides
        self._step_decodes(view, batch)
        sp_prefill = next((r for r in view.running if r.is_prefill
                           and scheduler.sp_prefill_plan(r.request_id) is not None), None)
        if sp_prefill is not None:
            scheduler.schedule_sp_slice(sp_prefill, batch)
            self._consolidate_if_last(scheduler, sp_prefill, batch)
            return
        if view.waiting and view.can_run_more and self._goes_sp(scheduler, view.waiting[0]):
            head = view.waiting[0]
            if self._admit_long(view, head, batch):
                self._consolidate_if_last(scheduler, head, batch)
                return
        for request in view.running:
            if request.is_prefill and batch.token_budget > 0 and request not in batch:
                scheduler.schedule_prefill(request, batch, chunked=True)
        for request in list(view.waiting):  # FCFS per instance
            if batch.token_budget <= 0 or not view.can_run_more:
                break
            if self._goes_sp(scheduler, request):
                break  # a long prompt waits for its group (reserved): no overtaking
            rank = view.local_rank(request)
            if rank is None:
                continue  # it waits for an instance elsewhere: the next one may run here
            if not view.admit_local(request, batch, rank):
                break

    def head_group(self, scheduler: SchedulerBooks) -> tuple[int, ...] | None:
        """The instances the waiting head needs together, if it is a long prompt."""
        if not scheduler.can_run_more or not self._goes_sp(scheduler, scheduler.waiting[0]):
            return None
        if self.configurator is None:
            return tuple(range(scheduler.sp_size))
        choice = self.configurator.choose(scheduler, scheduler.waiting[0])
        return None if choice is None else choice.ranks

    def _consolidate_if_last(self, scheduler: SchedulerBooks, request: Request,
                             batch: BatchBuilder) -> None:
        """With consolidation, when the batch holds the request's last SP slice: move its KV
        onto the least-loaded rank of its group (fewest used blocks, ties to the highest) that
        holds all of it plus its remaining output: decode batches stay balanced, and while the
        load is light decodes gather at the top, leaving the lower instances free together."""
        if not self.consolidate:
            return
        scheduled = next(n for r, n in batch.entries if r is request)
        if request.num_computed_tokens + scheduled != request.num_tokens:
            return
        plan = scheduler.sp_prefill_plan(request.request_id)
        manager = scheduler.kv_cache_manager
        group = sorted({r for row in plan.slices or (plan.chunk_lens,)
                        for r, n in enumerate(row) if n},
                       key=lambda r: (manager.pools[r].num_used_blocks, -r))
        output_left = max(0, min(request.max_tokens - len(request.output_token_ids),
                                 scheduler.max_model_len - request.num_tokens))
        headroom = -(-output_left // manager.block_size)
        for rank in group:
            need = manager.blocks_to_move(request.request_id, rank)
            if 0 <= need and need + headroom <= manager.pools[rank].num_free_blocks:
                scheduler.consolidate(request, batch, rank)
                return

    def _step_decodes(self, view: InstanceView, batch: BatchBuilder) -> None:
        for request in list(view.running):
            if (request in view.running and not request.is_prefill and request not in batch
                    and not view.schedule_decode(request, batch)):
                break

    def _admit_long(self, view: InstanceView, request: Request, batch: BatchBuilder) -> bool:
        """Admit the waiting head as an SP prefill when its group is inside the view (or, by
        the configurator, locally on a rank of the view); else reserve the group. True when
        its first slice is in the batch."""
        scheduler = view.scheduler
        group, plan, chunk = tuple(range(scheduler.sp_size)), None, self.sp_prefill_chunk
        if self.configurator is not None:
            choice = self.configurator.choose(scheduler, request)
            if choice is None:
                return False
            group, plan, chunk = choice.ranks, choice.plan, choice.chunk
            if choice.degree == 1:
                if group[0] in view.instances and batch.token_budget > 0:
                    scheduler.admit_local(request, batch, rank=group[0])
                elif group[0] not in view.instances:
                    view.reserve(group)
                return False
        if not set(group) <= set(view.instances):
            view.reserve(group)
            return False
        return view.admit_sequence_parallel(request, batch, plan, chunk)
