"""One SP rank's share of a step whose requests are spread over an SP group.

Every rank of the step sees the whole SchedulerOutput, with ranks counted from the step's first
instance (engine/step_view.py), and keeps its part (algorithms.md §2.1, §2.4):
- the requests this rank leads. Those whose KV is all here attend over their block table;
  decodes whose KV spans ranks come next and attend through the q-move exchange, in which every
  rank of the step takes part, leading something or not;
- at most one SP prefill slice, its rows last: this rank's contiguous chunk of the slice, at
  its global positions, its K/V written to this rank's blocks, attending to the slice over the
  prefill's group and to the prompt's earlier slices where they lie (parallel/sp_prefix.py);
  the last rank, holding the prompt's last token, samples.
Returns None when this rank has nothing to run and no exchange to join.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from csps.attention.metadata import AttentionMetadata
from csps.attention.sp_decode_plan import SpDecodePlan
from csps.attention.sp_prefill_plan import SpPrefillPlan, held_slots
from csps.contract.step import ScheduledRequest
from csps.engine.model_input import ModelInput, flatten_requests, prompt_span


def prepare_sp_inputs(requests: Sequence[ScheduledRequest], sp_rank: int, sp_size: int,
                      block_size: int, device: torch.device) -> ModelInput | None:
    prefills = [r for r in requests if r.is_sp_prefill]
    if len(prefills) > 1:
        raise ValueError(f"a step runs at most one SP prefill, got {len(prefills)}")
    head = _led_input([r for r in requests if not r.is_sp_prefill], sp_rank, sp_size,
                      block_size, device)
    tail = (_sp_prefill_input(prefills[0], sp_rank, block_size, device)
            if prefills else None)
    if tail is None or head is None:
        return tail or head
    offset = head.input_ids.shape[0]
    metadata = replace(head.metadata, sp_slice=tail.metadata)
    return ModelInput(torch.cat([head.input_ids, tail.input_ids]),
                      torch.cat([head.positions, tail.positions]), metadata,
                      head.samples + [(row + offset, r) for row, r in tail.samples],
                      head.prompt_spans + [replace(s, row_start=s.row_start + offset)
                                           for s in tail.prompt_spans])


def _led_input(requests: Sequence[ScheduledRequest], sp_rank: int, sp_size: int,
               block_size: int, device: torch.device) -> ModelInput | None:
    """The requests this rank leads, local ones first, then its spread decodes."""
    mine = [r for r in requests if r.leader == sp_rank]
    local = [r for r in mine if not r.is_distributed]
    spread = [r for r in mine if r.is_distributed]
    has_exchange = any(r.is_distributed for r in requests)
    if not mine and not has_exchange:
        return None
    input_ids, positions, samples, spans = flatten_requests(local + spread)
    metadata = AttentionMetadata.build(
        [(r.num_computed_tokens, r.num_scheduled_tokens, r.block_ids) for r in local],
        block_size=block_size, device=device)
    if has_exchange:
        plan = SpDecodePlan.build(requests, sp_rank, sp_size, block_size, device)
        metadata = replace(metadata, sp_decode=plan)
    return ModelInput.from_lists(input_ids, positions, metadata, samples, device, spans)


def _sp_prefill_input(request: ScheduledRequest, sp_rank: int, block_size: int,
                      device: torch.device) -> ModelInput | None:
    """This rank's chunk of an SP prefill slice; None when it computes none of it. Chunk
    lengths come indexed by the step's ranks; the prefill's group is the contiguous run of
    ranks with a nonzero chunk, and its metadata counts ranks from the group's first."""
    lens = list(request.sp_chunk_lens)
    ranks = [r for r, n in enumerate(lens) if n]
    if not ranks or ranks != list(range(ranks[0], ranks[-1] + 1)):
        raise ValueError(f"{request.request_id}: SP chunks {lens} are not one contiguous "
                         "group of ranks")
    if sum(lens) != request.num_scheduled_tokens:
        raise ValueError(f"{request.request_id}: SP chunks {lens} do not tile the "
                         f"{request.num_scheduled_tokens} scheduled tokens")
    if not lens[sp_rank]:
        return None
    first, computed = ranks[0], request.num_computed_tokens
    chunk_lens = lens[first:ranks[-1] + 1]  # the group's, in its rank order
    start = computed + sum(lens[:sp_rank])
    end = start + lens[sp_rank]
    plan = SpPrefillPlan.for_request(chunk_lens, request.kv_ranges, sp_rank, block_size, device,
                                     request.sp_attention, num_computed=computed,
                                     first=first)
    slots = None
    if plan is None or not plan.migrates:  # this rank keeps its own chunk
        slots = held_slots(request.kv_ranges, sp_rank, start, end, block_size, device)  # [n_r]
        if slots.shape[0] != end - start:
            raise ValueError(f"{request.request_id}: rank {sp_rank} does not hold its chunk "
                             f"[{start}, {end})")
    metadata = AttentionMetadata.build_sp_prefill(chunk_lens, sp_rank - first, device,
                                                  slot_mapping=slots, block_size=block_size,
                                                  plan=plan, num_computed=computed,
                                                  group_first=first)
    samples = ([(end - start - 1, request)]
               if sp_rank == request.leader and request.do_sample else [])
    span = prompt_span(request, 0, start, end)
    return ModelInput.from_lists(request.token_ids[start - computed:end - computed],
                                 list(range(start, end)), metadata, samples, device,
                                 [span] if span is not None else [])
