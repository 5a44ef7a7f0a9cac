"""SequenceParallelAttention: the AttentionBackend of SP-NTP prefill (algorithms.md §2.1) and of
q-move decode over KV spread across the SP group (§2.4, sp_decode.py), on the process group of
the step a worker runs (bound per step; one group per contiguous set of SP ranks).

Each rank of an SP prefill's group runs the whole model on one contiguous chunk of a slice of
a single prompt (RoPE at global positions, chosen by the caller's `positions`), keeps that
chunk's K/V in its own paged cache, and computes attention across chunks with one of the SP
primitives; a later slice of a chunked prefill also attends to the earlier slices' KV where it
lies (sp_prefix.py). Rows without SP work go to the reference backend, and rows of an
SpDecodePlan send their spread decodes' queries to the KV. One step may hold all three: local
rows, spread decodes, then one SP prefill slice (stall-free hybrid batching under SP).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from csps.attention.backend import AttentionBackend
from csps.attention.merge import merge_attn_states
from csps.attention.reference import ReferenceAttentionBackend
from csps.contract.csa_config import CsaConfig
from csps.parallel.allgather_kv import allgather_kv_attention
from csps.parallel.csa import csa_attention
from csps.parallel.ring import ring_attention
from csps.parallel.sp_decode import kvmove_decode_attention, qmove_decode_attention
from csps.parallel.sp_prefix import prefix_attention
from csps.parallel.ulysses import ulysses_attention

if TYPE_CHECKING:
    from csps.attention.metadata import AttentionMetadata
    from csps.attention.sp_prefill_plan import SpPrefillPlan
    from csps.kvcache.paged_cache import KVCache
    from csps.parallel.comm import Communicator

# Each (q, k, v, chunk_lens, comm, scale=None) -> out; collective over comm's group.
SP_ALGORITHMS = {"ulysses": ulysses_attention, "allgather_kv": allgather_kv_attention,
                 "ring": ring_attention, "csa": csa_attention}
# Each (q, k, v, kv_cache, plan, comm, scale) -> out; collective over comm's group.
SP_DECODE_MODES = {"qmove": qmove_decode_attention, "kvmove": kvmove_decode_attention}


class SequenceParallelAttention(AttentionBackend):
    """The SP attention of one worker: SP prefill slices and spread decodes over the process
    group of the step it runs (bind), the reference backend otherwise.

    Every rank of a group must run the same forward (same layers, same chunk_lens) at the
    same time: each layer's attention is a collective. Not thread-safe (one forward at a time).
    """

    name = "sequence_parallel"

    def __init__(self, comm: Communicator, algorithm: str = "ulysses",
                 decode_comm: Communicator | None = None, decode_mode: str = "qmove",
                 csa_config: CsaConfig | None = None,
                 sub_groups: dict[tuple[int, int], tuple[Communicator, Communicator]]
                 | None = None) -> None:
        """comm / decode_comm: the whole SP group (prefill and decode traffic counted apart);
        sub_groups: (first SP rank, size) -> the same pair for each contiguous part of it."""
        if algorithm not in SP_ALGORITHMS:
            raise ValueError(f"unknown SP algorithm {algorithm!r}; known: {list(SP_ALGORITHMS)}")
        if decode_mode not in SP_DECODE_MODES:
            raise ValueError(f"unknown SP decode mode {decode_mode!r}; "
                             f"known: {list(SP_DECODE_MODES)}")
        if algorithm == "csa" and csa_config is None:
            raise ValueError("SP attention 'csa' needs a CsaConfig")
        self._decode_spread = SP_DECODE_MODES[decode_mode]
        self._groups = {**(sub_groups or {}), (0, comm.size): (comm, decode_comm or comm)}
        self.comm, self.decode_comm = self._groups[(0, comm.size)]  # the bound step's group
        self._step_first = 0
        self.algorithm = algorithm
        self._csa_config = csa_config
        self._per_request: dict[tuple, object] = {}  # algorithm choices, built once
        self._attend_for(None, comm.size)  # fail now on a CsaConfig that misfits the group
        self._fallback = ReferenceAttentionBackend()  # rows without SP work

    def bind(self, first: int, size: int) -> None:
        """Run the next forwards as a step of SP ranks first .. first + size - 1 (their
        process group; the metadata's ranks count from `first`)."""
        self.comm, self.decode_comm = self._group(first, size)
        self._step_first = first

    def _group(self, first: int, size: int) -> tuple[Communicator, Communicator]:
        if (first, size) not in self._groups:
            raise ValueError(f"no process group for SP ranks {first} .. {first + size - 1}")
        return self._groups[(first, size)]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata,
                scale: float | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]. Rows: the metadata's local requests,
        then its spread decodes (metadata.sp_decode), then an SP prefill slice
        (metadata.sp_slice, or the whole batch when metadata.sp_chunk_lens is set)."""
        if metadata.sp_chunk_lens is not None:
            return self._prefill(q, k, v, kv_cache, metadata, scale)
        tail = metadata.sp_slice
        n = q.shape[0] - (tail.num_tokens if tail is not None else 0)
        parts = []
        if metadata.sp_decode is not None:
            parts.append(self._decode(q[:n], k[:n], v[:n], kv_cache, metadata, scale))
        elif n:
            parts.append(self._fallback.forward(q[:n], k[:n], v[:n], kv_cache, metadata,
                                                scale=scale))
        if tail is not None:
            parts.append(self._prefill(q[n:], k[n:], v[n:], kv_cache, tail, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: KVCache | None, metadata: AttentionMetadata,
                 scale: float | None) -> torch.Tensor:
        """This rank's chunk of an SP prefill slice over the prefill's group: writes k, v to
        the local kv_cache at metadata.slot_mapping (when a cache is given), attends over the
        slice and, for a later slice of a chunked prefill, over the prompt's earlier KV where
        it lies. Raises ValueError for a layout that does not match this rank or its group."""
        chunk_lens = metadata.sp_chunk_lens
        comm, _ = self._group(self._step_first + metadata.sp_group_first, len(chunk_lens))
        self._check(q, metadata, chunk_lens, comm)
        plan = metadata.sp_prefill
        attend, algorithm = self._attend_for(plan, comm.size)
        prefix = plan.prefix_slots if plan is not None else None
        if plan is not None and plan.migrates:
            if algorithm != "ring":
                raise ValueError("KV placed on other ranks than its chunk's (scale-down) needs "
                                 f"ring attention, which passes every chunk; got {algorithm}")
            if kv_cache is None:
                raise ValueError("a KV migration plan needs a kv_cache")
            keep = plan.kv_keep

            def write(src: int, keys: torch.Tensor, values: torch.Tensor) -> None:
                if src in keep:
                    rows, slots = keep[src]
                    kv_cache.write_slots(keys[rows], values[rows], slots)
            return attend(q, k, v, chunk_lens, comm, scale=scale, on_block=write)
        if kv_cache is not None:
            if metadata.slot_mapping is None:
                raise ValueError("a kv_cache needs metadata built with slot_mapping")
            kv_cache.write_slots(k, v, metadata.slot_mapping)
        if prefix is None:
            return attend(q, k, v, chunk_lens, comm, scale=scale)
        if kv_cache is None:
            raise ValueError("a later slice of a chunked SP prefill needs the kv_cache")
        out, lse = attend(q, k, v, chunk_lens, comm, scale=scale, return_lse=True)
        prefix_k, prefix_v = kv_cache.read_slots(prefix)  # [m, Hkv, D] this rank's prefix
        early_out, early_lse = prefix_attention(q, prefix_k, prefix_v, chunk_lens, comm, scale)
        return merge_attn_states([early_out, out], [early_lse, lse])[0].to(q.dtype)

    def _attend_for(self, plan: SpPrefillPlan | None, size: int):
        """(attention function, algorithm name) for this request on a group of `size`: the
        plan's choice or ours. Built once per choice and size."""
        chosen = plan.attention if plan is not None else None
        algorithm = chosen.algorithm if chosen is not None else self.algorithm
        config = chosen.csa if chosen is not None else self._csa_config
        key = (algorithm, config if algorithm == "csa" else None, size)
        if key not in self._per_request:
            if algorithm not in SP_ALGORITHMS:
                raise ValueError(f"unknown SP algorithm {algorithm!r}")
            fn = SP_ALGORITHMS[algorithm]
            if algorithm == "csa":
                if config is None:
                    raise ValueError("SP attention 'csa' needs CSA levels")
                config.check_sp_size(size)
                fn = functools.partial(csa_attention, config=config)
            self._per_request[key] = fn
        return self._per_request[key], algorithm

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float | None) -> torch.Tensor:
        """Rows [0, metadata.num_tokens): local requests (reference backend); the rest: this
        rank's led spread decodes (q-move or kv-move). Collective: every SP rank calls it
        each layer."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        n = metadata.num_tokens
        if q.shape[0] != n + metadata.sp_decode.num_led:
            raise ValueError(f"{q.shape[0]} rows, expected {n} local + "
                             f"{metadata.sp_decode.num_led} spread decodes")
        spread = self._decode_spread(q[n:], k[n:], v[n:], kv_cache, metadata.sp_decode,
                                     self.decode_comm, scale)
        if n == 0:
            return spread
        local = self._fallback.forward(q[:n], k[:n], v[:n], kv_cache, metadata, scale=scale)
        return torch.cat([local, spread])

    def _check(self, q: torch.Tensor, metadata: AttentionMetadata, chunk_lens: list[int],
               comm: Communicator) -> None:
        if metadata.num_reqs != 1:
            raise ValueError(f"an SP forward takes exactly one request, got {metadata.num_reqs}")
        if len(chunk_lens) != comm.size:
            raise ValueError(f"sp_chunk_lens has {len(chunk_lens)} chunks for an SP group of "
                             f"{comm.size}")
        plan = metadata.sp_prefill
        if metadata.num_computed_tokens[0] and (plan is None or plan.prefix_slots is None):
            raise ValueError("a later slice of an SP prefill needs its prefix's slots "
                             f"(num_computed_tokens={metadata.num_computed_tokens[0]})")
        if chunk_lens[comm.rank] != q.shape[0]:
            raise ValueError(f"rank {comm.rank} holds {q.shape[0]} tokens but "
                             f"sp_chunk_lens says {chunk_lens[comm.rank]}")
