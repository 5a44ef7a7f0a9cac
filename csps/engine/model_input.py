"""ModelInput: one iteration's flat tensors on one rank, built from the SchedulerOutput.

`prepare_inputs` serves a single SP rank (every request's KV in its `block_ids`);
sp_model_input.py builds a rank's share when requests are spread over an SP group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csps.attention.metadata import AttentionMetadata
from csps.contract.step import ScheduledRequest


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, the tokens' positions in their requests
    metadata: AttentionMetadata
    samples: list[tuple[int, ScheduledRequest]]  # (row, request): sample the row's logits

    @classmethod
    def from_lists(cls, input_ids: list[int], positions: list[int],
                   metadata: AttentionMetadata, samples: list[tuple[int, ScheduledRequest]],
                   device: torch.device) -> ModelInput:
        return cls(torch.tensor(input_ids, dtype=torch.long, device=device),
                   torch.tensor(positions, dtype=torch.long, device=device), metadata, samples)


Samples = list[tuple[int, ScheduledRequest]]  # (row, request): sample the row's logits


def flatten_requests(requests: Sequence[ScheduledRequest],
                     ) -> tuple[list[int], list[int], Samples]:
    """Token ids, positions and sampling rows of requests laid out one after another."""
    input_ids: list[int] = []
    positions: list[int] = []
    samples: list[tuple[int, ScheduledRequest]] = []
    for r in requests:
        input_ids.extend(r.token_ids)
        positions.extend(range(r.num_computed_tokens,
                               r.num_computed_tokens + r.num_scheduled_tokens))
        if r.do_sample:
            samples.append((len(input_ids) - 1, r))
    return input_ids, positions, samples


def prepare_inputs(requests: Sequence[ScheduledRequest], block_size: int,
                   device: torch.device) -> ModelInput:
    """All requests on this rank, each attending over its own block table."""
    input_ids, positions, samples = flatten_requests(requests)
    metadata = AttentionMetadata.build(
        [(r.num_computed_tokens, r.num_scheduled_tokens, r.block_ids) for r in requests],
        block_size=block_size, device=device)
    return ModelInput.from_lists(input_ids, positions, metadata, samples, device)
