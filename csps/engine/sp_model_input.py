"""One SP rank's share of an iteration whose requests are spread over an SP group.

Every rank sees the whole SchedulerOutput and keeps its part (algorithms.md §2.1, §2.4):
- an SP prefill: this rank's contiguous chunk of the prompt, at its global positions, its K/V
  written to this rank's blocks; the last rank, holding the prompt's last token, samples;
- otherwise: the requests this rank leads. Those whose KV is all here attend over their block
  table; decodes whose KV spans ranks come last and attend through the q-move exchange, in
  which every rank takes part, leading something or not.
Returns None when this rank has nothing to run and no exchange to join.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from csps.attention.metadata import AttentionMetadata
from csps.attention.sp_decode_plan import SpDecodePlan
from csps.attention.sp_prefill_plan import SpPrefillPlan
from csps.engine.model_input import ModelInput, flatten_requests
from csps.parallel.csa_config import CsaConfig
from csps.scheduler.output import ScheduledRequest


def prepare_sp_inputs(requests: Sequence[ScheduledRequest], sp_rank: int, sp_size: int,
                      block_size: int, device: torch.device,
                      csa_options: tuple[str, str, str] = ("", "all", "")) -> ModelInput | None:
    """csa_options: the worker's (levels, far_queries, micro_batch), the base of a request's
    own CSA choice."""
    prefills = [r for r in requests if r.is_sp_prefill]
    if prefills:
        if len(requests) != 1:
            raise ValueError("an SP prefill must be alone in its iteration, got "
                             f"{len(requests)} requests")
        return _sp_prefill_input(prefills[0], sp_rank, block_size, device, csa_options)
    mine = [r for r in requests if r.leader == sp_rank]
    local = [r for r in mine if not r.is_distributed]
    spread = [r for r in mine if r.is_distributed]
    has_exchange = any(r.is_distributed for r in requests)
    if not mine and not has_exchange:
        return None
    input_ids, positions, samples = flatten_requests(local + spread)
    metadata = AttentionMetadata.build(
        [(r.num_computed_tokens, r.num_scheduled_tokens, r.block_ids) for r in local],
        block_size=block_size, device=device)
    if has_exchange:
        plan = SpDecodePlan.build(requests, sp_rank, sp_size, block_size, device)
        metadata = _with_plan(metadata, plan)
    return ModelInput.from_lists(input_ids, positions, metadata, samples, device)


def _with_plan(metadata: AttentionMetadata, plan: SpDecodePlan) -> AttentionMetadata:
    fields = {name: getattr(metadata, name) for name in metadata.__dataclass_fields__}
    return AttentionMetadata(**{**fields, "sp_decode": plan})


def _sp_prefill_input(request: ScheduledRequest, sp_rank: int, block_size: int,
                      device: torch.device, csa_options: tuple[str, str, str]) -> ModelInput:
    chunk_lens = list(request.sp_chunk_lens)
    if sum(chunk_lens) != request.num_scheduled_tokens or request.num_computed_tokens:
        raise ValueError(f"{request.request_id}: SP chunks {chunk_lens} do not tile a fresh "
                         f"prompt of {request.num_scheduled_tokens} tokens")
    start = sum(chunk_lens[:sp_rank])
    end = start + chunk_lens[sp_rank]
    plan = SpPrefillPlan.for_request(chunk_lens, request.kv_ranges, sp_rank, block_size, device,
                                     getattr(request, "sp_attention", None),
                                     _request_csa(request, csa_options))
    slots = None
    if plan is None or not plan.migrates:  # this rank keeps its own chunk
        (held,) = [r for r in request.kv_ranges if r.rank == sp_rank]
        if (held.start, held.end) != (start, end):
            raise ValueError(f"{request.request_id}: rank {sp_rank} holds [{held.start}, "
                             f"{held.end}) but its chunk is [{start}, {end})")
        offsets = torch.arange(block_size, dtype=torch.int64)
        slots = (torch.tensor(held.block_ids, dtype=torch.int64)[:, None] * block_size
                 + offsets).reshape(-1)[:end - start].to(device)  # [n_r]
    metadata = AttentionMetadata.build_sp_prefill(chunk_lens, sp_rank, device,
                                                  slot_mapping=slots, block_size=block_size,
                                                  plan=plan)
    samples = [(end - start - 1, request)] if sp_rank == request.leader else []
    return ModelInput.from_lists(request.token_ids[start:end], list(range(start, end)),
                                 metadata, samples, device)


def _request_csa(request: ScheduledRequest, csa_options: tuple[str, str, str]) -> CsaConfig | None:
    """The request's own CSA levels / micro-batch (the sps2 configurator's), or None."""
    levels = getattr(request, "csa_levels", None)
    micro_batch = getattr(request, "csa_micro_batch", None)
    if levels is None and micro_batch is None:
        return None
    base_levels, far_queries, base_micro = csa_options
    return CsaConfig.parse(levels or base_levels, far_queries,
                           base_micro if micro_batch is None else micro_batch)
