"""SpPrefillPlan: one SP prefill's per-request choices and where its KV lands, on one rank.

The scheduler may choose, per request, the SP attention algorithm and CSA levels / micro-batch
(the sps2 configurator) and may place the prompt's KV on other ranks than those that compute
it (LoongServe's scale-down: ScheduledRequest.kv_ranges differ from sp_chunk_lens). Ring
attention passes every chunk's K/V through every rank, so a rank keeps the rows it is assigned
as the chunk goes by, at no extra transfer; the other algorithms do not see every chunk and
refuse such a plan. A slice of a chunked SP prefill (num_computed > 0) also carries the slots of
the prompt's earlier KV that this rank holds, which the slice attends to in place
(parallel/sp_prefix.py). Built by engine/sp_model_input.py, read by parallel/sp_attention.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csps.contract.sp_attention import SpAttention
from csps.contract.token_range import TokenRange


@dataclass(frozen=True, eq=False)
class SpPrefillPlan:
    attention: SpAttention | None = None  # the request's (None: the backend's, for callers
    # that run the model directly, e.g. tests; the engine's steps always carry one)
    # chunk index -> (rows [m] int64 inside that chunk, slots [m] int64 in this rank's cache).
    # None: this rank keeps exactly its own chunk, at metadata.slot_mapping.
    kv_keep: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    # A later slice of a chunked SP prefill: [m] int64, this rank's cache slots of the prompt's
    # positions before the slice (m may be 0). None: a fresh prompt, no prefix.
    prefix_slots: torch.Tensor | None = None

    @property
    def migrates(self) -> bool:
        return self.kv_keep is not None

    @staticmethod
    def keep_map(chunk_lens: Sequence[int], kv_ranges: Sequence[TokenRange], sp_rank: int,
                 block_size: int, device: torch.device | str
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """For every chunk, the rows of it that this rank holds in kv_ranges, and their slots."""
        keep, chunk_start = {}, 0
        for src, length in enumerate(chunk_lens):
            chunk_end = chunk_start + length
            rows, slots = [], []
            for held in kv_ranges:
                if held.rank != sp_rank:
                    continue
                for pos in range(max(held.start, chunk_start), min(held.end, chunk_end)):
                    offset = pos - held.start
                    rows.append(pos - chunk_start)
                    slots.append(held.block_ids[offset // block_size] * block_size
                                 + offset % block_size)
            if rows:
                keep[src] = (torch.tensor(rows, dtype=torch.int64, device=device),
                             torch.tensor(slots, dtype=torch.int64, device=device))
            chunk_start = chunk_end
        return keep

    @classmethod
    def for_request(cls, chunk_lens: Sequence[int], kv_ranges: Sequence[TokenRange],
                    sp_rank: int, block_size: int, device: torch.device | str,
                    attention: SpAttention | None, num_computed: int = 0,
                    first: int = 0) -> SpPrefillPlan | None:
        """The plan, or None when nothing differs from the backend's default (a fresh prompt;
        every rank keeps exactly its own chunk; the configured algorithm). Decided from the
        whole placement, so every rank of the group agrees on it. num_computed: the slice's
        first position (its prompt's KV before it is already on the group's ranks). Chunk i
        of chunk_lens runs on rank first + i (the ranks in kv_ranges and sp_rank)."""
        starts = [num_computed + sum(chunk_lens[:r]) for r in range(len(chunk_lens))]
        written = [(r.rank, r.start, r.end) for r in kv_ranges if r.end > num_computed]
        identity = sorted(written) == [
            (first + i, starts[i], starts[i] + n) for i, n in enumerate(chunk_lens) if n]
        if not identity and num_computed:
            raise ValueError("a later slice of a chunked SP prefill keeps its KV where it is "
                             "computed (no migration plan)")
        kv_keep = None if identity else cls.keep_map(chunk_lens, kv_ranges, sp_rank,
                                                     block_size, device)
        prefix = (held_slots(kv_ranges, sp_rank, 0, num_computed, block_size, device)
                  if num_computed else None)
        if kv_keep is None and attention is None and prefix is None:
            return None
        return cls(attention=attention, kv_keep=kv_keep, prefix_slots=prefix)


def held_slots(kv_ranges: Sequence[TokenRange], rank: int, start: int, end: int,
               block_size: int, device: torch.device | str) -> torch.Tensor:
    """[m] int64: the cache slots on `rank` of the positions in [start, end) it holds, in
    position order (m may be 0)."""
    slots = []
    for held in kv_ranges:
        if held.rank != rank:
            continue
        for pos in range(max(held.start, start), min(held.end, end)):
            offset = pos - held.start
            slots.append(held.block_ids[offset // block_size] * block_size + offset % block_size)
    return torch.tensor(slots, dtype=torch.int64, device=device)
