"""ModelInput: one iteration's flat tensors on one rank, built from the SchedulerOutput.

`prepare_inputs` serves a single SP rank (every request's KV in its `block_ids`);
sp_model_input.py builds a rank's share when requests are spread over an SP group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from csps.attention.metadata import AttentionMetadata
from csps.contract.step import ScheduledRequest


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, the tokens' positions in their requests
    metadata: AttentionMetadata
    samples: list[tuple[int, ScheduledRequest]]  # (row, request): sample the row's logits
    prompt_spans: list[PromptSpan] = field(default_factory=list)

    @classmethod
    def from_lists(cls, input_ids: list[int], positions: list[int],
                   metadata: AttentionMetadata, samples: list[tuple[int, ScheduledRequest]],
                   device: torch.device, prompt_spans: list[PromptSpan] | None = None,
                   ) -> ModelInput:
        return cls(torch.tensor(input_ids, dtype=torch.long, device=device),
                   torch.tensor(positions, dtype=torch.long, device=device), metadata, samples,
                   prompt_spans or [])


Samples = list[tuple[int, ScheduledRequest]]  # (row, request): sample the row's logits


@dataclass(frozen=True)
class PromptSpan:
    """Rows row_start.. hold positions first_position.. of `request`, each predicting the
    prompt token in `targets` (prompt logprobs)."""

    row_start: int
    first_position: int
    request: ScheduledRequest
    targets: list[int]


def prompt_span(request: ScheduledRequest, row_start: int, start: int,
                end: int) -> PromptSpan | None:
    """The prompt-logprob rows of `request` laid out from row_start at positions [start, end);
    None when it asks for none or none of these positions predicts a prompt token."""
    context = request.sampling_context
    if request.sampling_params.prompt_logprobs is None or context is None:
        return None
    targets = context.prompt_targets(request.token_ids, request.num_computed_tokens, start, end)
    return PromptSpan(row_start, start, request, targets) if targets else None


def flatten_requests(requests: Sequence[ScheduledRequest],
                     ) -> tuple[list[int], list[int], Samples, list[PromptSpan]]:
    """Token ids, positions, sampling rows and prompt-logprob spans of requests laid out one
    after another."""
    input_ids: list[int] = []
    positions: list[int] = []
    samples: list[tuple[int, ScheduledRequest]] = []
    spans: list[PromptSpan] = []
    for r in requests:
        start, end = r.num_computed_tokens, r.num_computed_tokens + r.num_scheduled_tokens
        span = prompt_span(r, len(input_ids), start, end)
        if span is not None:
            spans.append(span)
        input_ids.extend(r.token_ids)
        positions.extend(range(start, end))
        if r.do_sample:
            samples.append((len(input_ids) - 1, r))
    return input_ids, positions, samples, spans


def prepare_inputs(requests: Sequence[ScheduledRequest], block_size: int,
                   device: torch.device) -> ModelInput:
    """All requests on this rank, each attending over its own block table."""
    input_ids, positions, samples, spans = flatten_requests(requests)
    metadata = AttentionMetadata.build(
        [(r.num_computed_tokens, r.num_scheduled_tokens, r.block_ids) for r in requests],
        block_size=block_size, device=device)
    return ModelInput.from_lists(input_ids, positions, metadata, samples, device, spans)
