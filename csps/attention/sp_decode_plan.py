"""SpDecodePlan: one SP rank's view of a q-move decode step (algorithms.md §2.4).

A decode request whose KV spans several SP ranks runs its dense layers on its leader. Each
layer the leader sends the new token's q, k, v to every rank holding part of the request's KV
(the rank that stores the new token's KV is one of them), each holder attends q over its local
KV and returns (out, lse), and the leader merges the parts. Every rank builds its plan from the
same SchedulerOutput, so all ranks agree on who sends what to whom without a handshake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csps.contract.step import ScheduledRequest


@dataclass(frozen=True)
class HeldDecode:
    """A distributed decode this rank holds KV for: the leader's query attends over `slots`."""

    leader: int  # the SP rank that sent the query and gets the partial result back
    slots: torch.Tensor  # [n] int64: this rank's cache slots of the request, new token included
    store_slot: int  # where this rank writes the new token's k/v; -1 if another rank stores it


@dataclass(frozen=True)
class SpDecodePlan:
    num_led: int  # distributed decodes this rank leads: the last num_led rows of its batch
    send_index: list[list[int]]  # per SP rank j: which of my led decodes j holds, in order
    held: list[HeldDecode]  # what arrives here, grouped by leader in rank order
    recv_counts: list[int]  # per SP rank j: how many of the held decodes j leads
    # kv-move only: per SP rank j, the tokens j holds of each led decode in send_index[j]
    held_tokens: list[list[int]]

    @classmethod
    def build(cls, requests: Sequence[ScheduledRequest], sp_rank: int, sp_size: int,
              block_size: int, device: torch.device | str) -> SpDecodePlan:
        """From this iteration's distributed decodes (all ranks', in scheduled order)."""
        decodes = [r for r in requests if r.is_distributed]
        for r in decodes:
            if r.num_scheduled_tokens != 1 or r.is_sp_prefill:
                raise ValueError(f"{r.request_id}: a request spread over ranks can only decode "
                                 f"one token per step, got {r.num_scheduled_tokens}")
        led = [r for r in decodes if r.leader == sp_rank]
        send_index = [[i for i, r in enumerate(led) if _holds(r, j)] for j in range(sp_size)]
        held_tokens = [[sum(x.num_tokens for x in led[i].kv_ranges if x.rank == j)
                        for i in index] for j, index in enumerate(send_index)]
        held, recv_counts = [], []
        for j in range(sp_size):
            mine = [r for r in decodes if r.leader == j and _holds(r, sp_rank)]
            recv_counts.append(len(mine))
            held.extend(HeldDecode(j, _local_slots(r, sp_rank, block_size, device),
                                   _store_slot(r, sp_rank, block_size)) for r in mine)
        return cls(num_led=len(led), send_index=send_index, held=held, recv_counts=recv_counts,
                   held_tokens=held_tokens)


def _holds(request: ScheduledRequest, rank: int) -> bool:
    return any(r.rank == rank for r in request.kv_ranges)


def _local_slots(request: ScheduledRequest, rank: int, block_size: int,
                 device: torch.device | str) -> torch.Tensor:
    """Slots of every position of the request held on `rank` (keys' order does not matter to
    a decode query: all keys precede it and carry their RoPE already)."""
    offsets = torch.arange(block_size, dtype=torch.int64)
    parts = []
    for r in request.kv_ranges:
        if r.rank == rank:
            blocks = torch.tensor(r.block_ids, dtype=torch.int64)
            parts.append((blocks[:, None] * block_size + offsets).reshape(-1)[:r.num_tokens])
    return torch.cat(parts).to(device)


def _store_slot(request: ScheduledRequest, rank: int, block_size: int) -> int:
    position = request.num_computed_tokens  # the new token
    for r in request.kv_ranges:
        if r.start <= position < r.end:
            if r.rank != rank:
                return -1
            offset = position - r.start
            return r.block_ids[offset // block_size] * block_size + offset % block_size
    raise ValueError(f"{request.request_id}: no KV range holds position {position}")
