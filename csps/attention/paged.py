"""PagedAttentionBackend ("paged"): the reference's contract, reading cached K/V in place.

Decodes and chunked prefills read a request's cached keys as views of runs of consecutive
blocks (paged_views.py) instead of gathering them into new tensors every step and layer.
Prefill from position 0 is the reference's causal SDPA on the new keys. A request whose table
is split into more than MAX_RUNS runs falls back to the reference's gather. A chunked prefill
over a cached prefix (an earlier chunk, prefix-cache blocks) merges the prefix's in-place runs,
unmasked, with the chunk's own causal keys by log-sum-exp. Slow twin:
ReferenceAttentionBackend ("reference"); equal within 1e-5 in fp32
(tests/test_paged_attention.py).
"""

from __future__ import annotations

import torch

from csps.attention.merge import merge_attn_states
from csps.attention.metadata import AttentionMetadata
from csps.attention.paged_kernel import kernel, paged_decode, usable
from csps.attention.paged_views import (
    MAX_RUNS,
    SlotRun,
    block_runs,
    decode_over_runs,
    queries_over_runs,
)
from csps.attention.partial import partial_attention
from csps.attention.reference import ReferenceAttentionBackend, _sdpa
from csps.kvcache.paged_cache import KVCache


class PagedAttentionBackend(ReferenceAttentionBackend):
    """Not thread-safe: one instance serves one model's layers, one forward at a time."""

    name = "paged"

    def __init__(self, use_kernel: bool = True) -> None:
        super().__init__()
        self.use_kernel = use_kernel  # decodes through paged_kernel.py where it serves
        if use_kernel:
            kernel()  # built (once per machine) or loaded now, not at the first decode
        self._runs_for: AttentionMetadata | None = None
        self._runs: list[list[SlotRun]] = []  # per request: runs of its seq_len keys
        self._decodes_for: AttentionMetadata | None = None
        self._decodes: tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata,
                scale: float | None = None) -> torch.Tensor:
        if kv_cache is None or not any(metadata.num_computed_tokens):
            return super().forward(q, k, v, kv_cache, metadata, scale)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if metadata.slot_mapping is None:
            raise ValueError("a kv_cache needs metadata built with slot_mapping")
        kv_cache.write_slots(k, v, metadata.slot_mapping)
        num_kv_heads, head_dim = kv_cache.k_cache.shape[2:]
        k_flat = kv_cache.k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, Hkv, D]
        v_flat = kv_cache.v_cache.view(-1, num_kv_heads, head_dim)
        out = torch.empty_like(q)  # [T, Hq, D]
        starts = metadata.query_starts
        in_kernel: set[int] = set()
        if self.use_kernel and usable(q, kv_cache.k_cache):
            in_kernel = self._kernel_decodes(q, out, kv_cache, metadata, scale)
        for r, runs in enumerate(self._plan_runs(metadata, kv_cache, in_kernel)):
            if r in in_kernel:
                continue
            rows = slice(starts[r], starts[r + 1])
            num_computed, num_new = metadata.num_computed_tokens[r], metadata.query_lens[r]
            if num_computed == 0:
                out[rows] = _sdpa(q[rows], k[rows], v[rows], scale, is_causal=True)
            elif num_new > 1:
                # NOTE: not one SDPA over prefix + chunk with a tril mask: a mask makes the CPU
                # kernel compute every pair (no causal skipping), 2x the work of a long chunk
                out[rows] = self._chunk_over_runs(q[rows], k[rows], v[rows], k_flat, v_flat,
                                                  metadata, r, kv_cache, scale)
            elif len(runs) <= MAX_RUNS:
                out[starts[r]] = decode_over_runs(q[starts[r]], k_flat, v_flat, runs, scale)[0]
            else:  # fragmented: gather this request's blocks once, then one run
                out[starts[r]] = self._gathered_decode(q[starts[r]], kv_cache, metadata, r,
                                                       scale)
        return out

    def _kernel_decodes(self, q: torch.Tensor, out: torch.Tensor, kv_cache: KVCache,
                        metadata: AttentionMetadata, scale: float) -> set[int]:
        """Every decode of the batch (one new token over a cached prefix) in one kernel call,
        written into out; returns their request indices."""
        if metadata is not self._decodes_for:
            requests = [r for r, (c, n) in enumerate(zip(metadata.num_computed_tokens,
                                                         metadata.query_lens, strict=True))
                        if c > 0 and n == 1]
            index = torch.tensor([metadata.query_starts[r] for r in requests], dtype=torch.long)
            tables = metadata.block_tables[requests].to(device="cpu", dtype=torch.long)
            lens = torch.tensor([metadata.seq_lens[r] for r in requests], dtype=torch.long)
            self._decodes, self._decodes_for = (requests, index, tables, lens), metadata
        requests, index, tables, lens = self._decodes
        if requests:
            decoded, _ = paged_decode(q[index], kv_cache.k_cache, kv_cache.v_cache, tables, lens,
                                      scale)  # [B, Hq, D]
            out[index] = decoded
        return set(requests)

    def _chunk_over_runs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_flat: torch.Tensor, v_flat: torch.Tensor, metadata: AttentionMetadata,
                         r: int, kv_cache: KVCache, scale: float) -> torch.Tensor:
        """Chunked prefill of request r, q/k/v [n, H, D], over a prefix split into runs: the
        prefix's runs read in place (no mask), the chunk's own keys causal, merged by LSE."""
        prefix = block_runs(metadata.block_tables[r].tolist(), metadata.num_computed_tokens[r],
                            kv_cache.block_size)
        if len(prefix) > MAX_RUNS:
            return self._prefix_attention(q, kv_cache, metadata, r, scale)
        prefix_out, prefix_lse = queries_over_runs(q, k_flat, v_flat, prefix, scale)
        own_out, own_lse = partial_attention(q, k, v, scale=scale, causal=True)
        return merge_attn_states([prefix_out, own_out], [prefix_lse, own_lse])[0]

    def _plan_runs(self, metadata: AttentionMetadata, kv_cache: KVCache,
                   skip: set[int]) -> list[list[SlotRun]]:
        """Each request's slot runs, computed once per batch (all layers share them); none for
        the requests in `skip` (the kernel walks their block tables itself)."""
        if metadata is not self._runs_for:
            tables = metadata.block_tables.tolist()
            self._runs = [[] if r in skip else block_runs(table, seq_len, kv_cache.block_size)
                          for r, (table, seq_len) in enumerate(zip(tables, metadata.seq_lens,
                                                                   strict=True))]
            self._runs_for = metadata
        return self._runs

    def _gathered_decode(self, q: torch.Tensor, kv_cache: KVCache,
                         metadata: AttentionMetadata, r: int, scale: float) -> torch.Tensor:
        """q [Hq, D] of request r over its gathered blocks -> [Hq, D]."""
        seq_len = metadata.seq_lens[r]
        num_blocks = -(-seq_len // kv_cache.block_size)
        keys, values = self._gather(kv_cache, metadata.block_tables[r, :num_blocks])
        return decode_over_runs(q, keys, values, [(0, seq_len)], scale)[0]


class PagedTorchAttentionBackend(PagedAttentionBackend):
    """"paged_torch": the same in-place reads with decodes on torch ops over views (no compiled
    kernel); the kernel's fallback, kept selectable for comparison."""

    name = "paged_torch"

    def __init__(self) -> None:
        super().__init__(use_kernel=False)
