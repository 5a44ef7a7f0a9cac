"""AttentionMetadata: what attention needs to know about a flat batch of T tokens from R requests.

Built once per model forward by the model runner and passed explicitly to every layer. Request r
owns query rows query_start_loc[r]:query_start_loc[r+1] at positions num_computed_tokens[r] + i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from csps.attention.sp_decode_plan import SpDecodePlan
    from csps.attention.sp_prefill_plan import SpPrefillPlan


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity; backends cache per batch
class AttentionMetadata:
    num_computed_tokens: list[int]  # per request: tokens already in the KV cache
    query_lens: list[int]  # per request: new tokens in this batch
    seq_lens: list[int]  # per request: num_computed_tokens + query_lens
    query_starts: list[int]  # [R + 1]: request r's rows are query_starts[r]:query_starts[r+1]
    query_start_loc: torch.Tensor  # [R + 1] int32, the same as a tensor (cu_seqlens_q)
    seq_lens_tensor: torch.Tensor  # [R] int32
    slot_mapping: torch.Tensor | None  # [T] int64, block_id * block_size + offset; None: no cache
    block_tables: torch.Tensor | None  # [R, max_num_blocks] int32, rows padded with 0
    block_size: int  # tokens per KV block (0 when there is no cache)
    # SP prefill only: tokens of the single request's prompt held by each rank of the SP group,
    # in rank (= sequence) order; this batch is this rank's chunk. None: no sequence parallelism.
    sp_chunk_lens: list[int] | None = None
    # ... and the step's rank that runs chunk 0 (the prefill's group: sp_group_first onwards).
    sp_group_first: int = 0
    # SP decode only: the q-move exchange of decodes whose KV spans SP ranks. Their rows come
    # after the R requests above (which describe the rank's other, local rows).
    sp_decode: SpDecodePlan | None = None
    # SP prefill only: per-request algorithm / CSA choice and KV placement other than "each
    # rank keeps its own chunk" (None: the backend's defaults).
    sp_prefill: SpPrefillPlan | None = None
    # A step's SP prefill slice batched after the rows above (stall-free hybrid batching under
    # SP): its own SP-prefill metadata (built by build_sp_prefill), its rows last.
    sp_slice: AttentionMetadata | None = None

    @classmethod
    def build(cls, requests: Sequence[tuple[int, int, Sequence[int]]], block_size: int,
              device: torch.device | str) -> AttentionMetadata:
        """From (num_computed_tokens, num_new_tokens, block_ids) per request, in batch order.

        block_ids lists the request's KV blocks from position 0 and must cover all its
        computed + new tokens. Raises ValueError otherwise.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        computed, query_lens, slots, tables = [], [], [], []
        for num_computed, num_new, block_ids in requests:
            if num_new < 1 or num_computed < 0:
                raise ValueError(f"bad request shape: computed={num_computed}, new={num_new}")
            seq_len = num_computed + num_new
            if len(block_ids) * block_size < seq_len:
                raise ValueError(f"{len(block_ids)} blocks of {block_size} cannot hold "
                                 f"{seq_len} tokens")
            computed.append(num_computed)
            query_lens.append(num_new)
            slots.extend(block_ids[p // block_size] * block_size + p % block_size
                         for p in range(num_computed, seq_len))
            tables.append(list(block_ids))
        max_blocks = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        return cls._from_lists(
            computed, query_lens, device, block_size=block_size,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(
                len(padded), max_blocks))

    @classmethod
    def build_no_cache(cls, query_lens: Sequence[int],
                       device: torch.device | str) -> AttentionMetadata:
        """Each request a plain causal sequence from position 0; nothing is cached."""
        if any(n < 1 for n in query_lens):
            raise ValueError(f"query lengths must be positive, got {list(query_lens)}")
        return cls._from_lists([0] * len(query_lens), list(query_lens), device,
                               block_size=0, slot_mapping=None, block_tables=None)

    @classmethod
    def build_sp_prefill(cls, chunk_lens: Sequence[int], sp_rank: int,
                         device: torch.device | str, slot_mapping: torch.Tensor | None = None,
                         block_size: int = 0,
                         plan: SpPrefillPlan | None = None,
                         num_computed: int = 0, group_first: int = 0) -> AttentionMetadata:
        """This rank's view of one prompt prefilled by sequence parallelism (algorithms.md §2.1).

        The rank's rows are chunk sp_rank of chunk_lens; slot_mapping [chunk_lens[sp_rank]]
        (int64) says where its chunk's K/V go in its own cache, None for no cache. The caller
        passes the chunk's global positions to the model. With a plan that migrates KV,
        slot_mapping is None and the plan's kv_keep says what goes where. num_computed: the
        first position of this slice of a chunked SP prefill (the plan's prefix_slots say
        where this rank holds the KV before it); group_first: the step's rank running chunk 0
        (sp_rank counts from it). Raises ValueError on a bad layout.
        """
        if min(chunk_lens, default=0) < 0 or chunk_lens[sp_rank:sp_rank + 1] in ([], [0]) \
                or not 0 <= sp_rank < len(chunk_lens):
            raise ValueError(f"bad SP layout: chunk_lens={list(chunk_lens)}, rank {sp_rank}")
        num_local = chunk_lens[sp_rank]
        if slot_mapping is not None and slot_mapping.shape != (num_local,):
            raise ValueError(f"slot_mapping must have shape [{num_local}], got "
                             f"{tuple(slot_mapping.shape)}")
        return cls._from_lists([num_computed], [num_local], device, block_size=block_size,
                               slot_mapping=slot_mapping, block_tables=None,
                               sp_chunk_lens=list(chunk_lens), sp_prefill=plan,
                               sp_group_first=group_first)

    @classmethod
    def _from_lists(cls, computed: list[int], query_lens: list[int], device: torch.device | str,
                    **cache_fields) -> AttentionMetadata:
        seq_lens = [c + q for c, q in zip(computed, query_lens, strict=True)]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        return cls(num_computed_tokens=computed, query_lens=query_lens, seq_lens=seq_lens,
                   query_starts=starts,
                   query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
                   seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                   **cache_fields)

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens, default=0)

    @property
    def has_kv_cache(self) -> bool:
        return self.slot_mapping is not None
