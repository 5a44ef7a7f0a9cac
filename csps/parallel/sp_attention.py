"""SequenceParallelAttention: the AttentionBackend of SP-NTP prefill (algorithms.md §2.1) and of
q-move decode over KV spread across the SP group (§2.4, sp_decode.py).

Each rank of the SP group runs the whole model on one contiguous chunk of a single prompt
(RoPE at global positions, chosen by the caller's `positions`), keeps that chunk's K/V in its
own paged cache, and computes attention across chunks with one of the SP primitives. Batches
without SP layout (metadata.sp_chunk_lens is None, e.g. decode steps) go to the reference
backend, and batches with an SpDecodePlan send their spread decodes' queries to the KV.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from csps.attention.backend import AttentionBackend
from csps.attention.reference import ReferenceAttentionBackend
from csps.parallel.allgather_kv import allgather_kv_attention
from csps.parallel.csa import csa_attention
from csps.parallel.csa_config import CsaConfig
from csps.parallel.ring import ring_attention
from csps.parallel.sp_decode import kvmove_decode_attention, qmove_decode_attention
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
    """SP prefill of one request over `comm`'s group; the reference backend otherwise.

    Every rank of the group must run the same forward (same layers, same chunk_lens) at the
    same time: each layer's attention is a collective. Not thread-safe (one forward at a time).
    """

    name = "sequence_parallel"

    def __init__(self, comm: Communicator, algorithm: str = "ulysses",
                 decode_comm: Communicator | None = None, decode_mode: str = "qmove",
                 csa_config: CsaConfig | None = None) -> None:
        if algorithm not in SP_ALGORITHMS:
            raise ValueError(f"unknown SP algorithm {algorithm!r}; known: {list(SP_ALGORITHMS)}")
        if decode_mode not in SP_DECODE_MODES:
            raise ValueError(f"unknown SP decode mode {decode_mode!r}; "
                             f"known: {list(SP_DECODE_MODES)}")
        self._decode_spread = SP_DECODE_MODES[decode_mode]
        self.comm = comm  # the SP group, ranks in chunk (= sequence) order
        self.decode_comm = decode_comm or comm  # the same group, counting decode bytes
        self.algorithm = algorithm
        self._attend = SP_ALGORITHMS[algorithm]
        if algorithm == "csa":  # sparse: needs its levels
            if csa_config is None:
                raise ValueError("SP attention 'csa' needs a CsaConfig")
            csa_config.check_sp_size(comm.size)
            self._attend = functools.partial(csa_attention, config=csa_config)
        self._csa_config = csa_config
        self._per_request: dict[tuple, object] = {}  # per-request algorithm choices, built once
        self._fallback = ReferenceAttentionBackend()  # batches without SP layout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata,
                scale: float | None = None) -> torch.Tensor:
        """q [n_r, Hq, D], k/v [n_r, Hkv, D]: this rank's chunk -> [n_r, Hq, D].

        With metadata.sp_chunk_lens set: writes k, v to the local kv_cache at
        metadata.slot_mapping (when a cache is given), then attends over the whole prompt.
        Raises ValueError for several requests, a cached prefix, or a layout that does not
        match this rank's rows or the group size.
        """
        if metadata.sp_decode is not None:
            return self._decode(q, k, v, kv_cache, metadata, scale)
        chunk_lens = metadata.sp_chunk_lens
        if chunk_lens is None:
            return self._fallback.forward(q, k, v, kv_cache, metadata, scale=scale)
        self._check(q, metadata, chunk_lens)
        plan = metadata.sp_prefill
        attend, algorithm = self._attend_for(plan)
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
            return attend(q, k, v, chunk_lens, self.comm, scale=scale, on_block=write)
        if kv_cache is not None:
            if metadata.slot_mapping is None:
                raise ValueError("a kv_cache needs metadata built with slot_mapping")
            kv_cache.write_slots(k, v, metadata.slot_mapping)
        return attend(q, k, v, chunk_lens, self.comm, scale=scale)

    def _attend_for(self, plan: SpPrefillPlan | None):
        """(attention function, algorithm name) for this request: the plan's choice or ours.
        Per-request choices are built once and cached."""
        if plan is None or (plan.algorithm is None and plan.csa_config is None):
            return self._attend, self.algorithm
        algorithm = plan.algorithm or self.algorithm
        key = (algorithm, plan.csa_config)  # CsaConfig is frozen: hashable
        if key not in self._per_request:
            if algorithm not in SP_ALGORITHMS:
                raise ValueError(f"unknown SP algorithm {algorithm!r}")
            fn = SP_ALGORITHMS[algorithm]
            if algorithm == "csa":
                config = plan.csa_config or self._csa_config
                if config is None:
                    raise ValueError("SP attention 'csa' needs CSA levels")
                config.check_sp_size(self.comm.size)
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

    def _check(self, q: torch.Tensor, metadata: AttentionMetadata,
               chunk_lens: list[int]) -> None:
        if metadata.num_reqs != 1:
            raise ValueError(f"an SP forward takes exactly one request, got {metadata.num_reqs}")
        if metadata.num_computed_tokens[0] != 0:
            raise ValueError("SP prefill after a cached prefix is not supported "
                             f"(num_computed_tokens={metadata.num_computed_tokens[0]})")
        if len(chunk_lens) != self.comm.size:
            raise ValueError(f"sp_chunk_lens has {len(chunk_lens)} chunks for an SP group of "
                             f"{self.comm.size}")
        if chunk_lens[self.comm.rank] != q.shape[0]:
            raise ValueError(f"rank {self.comm.rank} holds {q.shape[0]} tokens but "
                             f"sp_chunk_lens says {chunk_lens[self.comm.rank]}")
