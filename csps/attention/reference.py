"""Plain-torch attention over a paged KV cache: the CPU oracle for every faster backend.

Prefill from position 0 is causal SDPA on the new keys; chunked prefill after a cached prefix
gathers the request's blocks and masks with the position offset; single-token decodes are
batched: one gather and one SDPA call per group of requests. `attention_with_lse` is the
partial-softmax twin used by merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csps.attention.backend import AttentionBackend
from csps.attention.metadata import AttentionMetadata
from csps.kvcache.paged_cache import KVCache

# Decode requests are gathered in groups whose K+V copy stays near this size, so SDPA reads
# them back from cache: on the 2-core dev machines 4-8 requests of 1k tokens per group ran
# ~25% faster than one group of 16. A group has at least 2 requests (SDPA parallelism).
_DECODE_GROUP_BYTES = 8 << 20


@dataclass(frozen=True)
class _DecodeGroup:
    rows: slice | torch.Tensor  # the requests' query rows in the flat batch
    block_tables: torch.Tensor  # [n, num_blocks] int32
    num_keys: int  # the longest request's keys; shorter ones are masked
    key_mask: torch.Tensor | None  # [n, 1, 1, num_keys] bool, True = attend; None = all


class ReferenceAttentionBackend(AttentionBackend):
    """Not thread-safe: one instance serves one model's layers, one forward at a time."""

    name = "reference"

    def __init__(self) -> None:
        # Reused flat gather buffers. NOTE: fresh multi-MB allocations are page-faulted in on
        # every use, which on the dev VMs costs more than the gather itself.
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        # Decode groups of the batch seen last: all layers of one forward share them.
        self._planned_for: AttentionMetadata | None = None
        self._decode_groups: list[_DecodeGroup] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata,
                scale: float | None = None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if kv_cache is None:
            if any(metadata.num_computed_tokens):
                raise ValueError("requests with a cached prefix need a kv_cache")
        elif metadata.slot_mapping is None:
            raise ValueError("a kv_cache needs metadata built with slot_mapping")
        else:
            kv_cache.write_slots(k, v, metadata.slot_mapping)
        out = torch.empty_like(q)  # [T, Hq, D]
        starts = metadata.query_starts
        for r, num_computed in enumerate(metadata.num_computed_tokens):
            rows = slice(starts[r], starts[r + 1])
            if num_computed == 0:
                out[rows] = _sdpa(q[rows], k[rows], v[rows], scale, is_causal=True)
            elif metadata.query_lens[r] > 1:
                out[rows] = self._prefix_attention(q[rows], kv_cache, metadata, r, scale)
        if kv_cache is not None:
            for group in self._plan_decode(metadata, kv_cache):
                out[group.rows] = self._decode_attention(q[group.rows], kv_cache, group, scale)
        return out

    def _plan_decode(self, metadata: AttentionMetadata, kv_cache: KVCache) -> list[_DecodeGroup]:
        if metadata is not self._planned_for:
            self._decode_groups = _plan_decode_groups(metadata, kv_cache)
            self._planned_for = metadata
        return self._decode_groups

    def _gather(self, kv_cache: KVCache,
                block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        numel = block_ids.numel() * kv_cache.k_cache[0].numel()
        cache = kv_cache.k_cache
        ws = self._workspace
        if ws is None or ws[0].numel() < numel or ws[0].dtype != cache.dtype \
                or ws[0].device != cache.device:
            ws = tuple(torch.empty(numel, dtype=cache.dtype, device=cache.device)
                       for _ in range(2))
            self._workspace = ws
        return kv_cache.gather_blocks(block_ids, out=ws)

    def _prefix_attention(self, q: torch.Tensor, kv_cache: KVCache,
                          metadata: AttentionMetadata, r: int, scale: float) -> torch.Tensor:
        """Chunked prefill of request r: q [n, Hq, D] at positions c..c+n-1 over keys 0..c+n-1."""
        num_computed, seq_len = metadata.num_computed_tokens[r], metadata.seq_lens[r]
        num_blocks = -(-seq_len // kv_cache.block_size)
        keys, values = self._gather(kv_cache, metadata.block_tables[r, :num_blocks])
        keys, values = keys[:seq_len], values[:seq_len]
        # query i (position c + i) sees key j iff j <= c + i: a lower triangle shifted by c.
        mask = torch.ones(q.shape[0], seq_len, dtype=torch.bool, device=q.device)
        return _sdpa(q, keys, values, scale, mask=mask.tril(num_computed))

    def _decode_attention(self, q: torch.Tensor, kv_cache: KVCache, group: _DecodeGroup,
                          scale: float) -> torch.Tensor:
        """q [n, Hq, D], one query per request -> [n, Hq, D]."""
        num_reqs, num_heads, head_dim = q.shape
        # NOTE: gathering first beats reading the cache in place even when the blocks are
        # consecutive: the copy streams from memory at full speed, SDPA's strided reads do not.
        keys, values = self._gather(kv_cache, group.block_tables)  # [n, B * bs, Hkv, D]
        keys, values = keys[:, :group.num_keys], values[:, :group.num_keys]
        num_kv_heads = keys.shape[2]
        # NOTE: a single query needs no causal mask, so the query heads sharing a KV head can
        # be folded into the query-length axis: [n, Hkv, group, D] against [n, Hkv, L, D].
        # That avoids repeating K/V per query head and gives SDPA a larger matrix per call.
        grouped = q.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys.transpose(1, 2),
                                             values.transpose(1, 2), attn_mask=group.key_mask,
                                             scale=scale)
        return out.reshape(num_reqs, num_heads, head_dim)


def _plan_decode_groups(metadata: AttentionMetadata, kv_cache: KVCache) -> list[_DecodeGroup]:
    """Split the single-query requests that follow a cached prefix into gather groups."""
    decodes = [r for r, (c, n) in enumerate(zip(metadata.num_computed_tokens,
                                                metadata.query_lens, strict=True))
               if c > 0 and n == 1]
    if not decodes:
        return []
    bytes_per_token = 2 * kv_cache.k_cache[0, 0].numel() * kv_cache.k_cache.element_size()
    longest = max(metadata.seq_lens[r] for r in decodes)
    group_size = max(2, _DECODE_GROUP_BYTES // (bytes_per_token * longest))
    device = kv_cache.k_cache.device
    groups = []
    for first in range(0, len(decodes), group_size):
        members = decodes[first:first + group_size]
        rows = [metadata.query_starts[r] for r in members]
        seq_lens = [metadata.seq_lens[r] for r in members]
        num_keys = max(seq_lens)
        num_blocks = -(-num_keys // kv_cache.block_size)
        key_mask = None
        if min(seq_lens) != num_keys:  # NOTE: equal lengths need no mask, only a slice
            lens = torch.tensor(seq_lens, device=device)
            key_mask = (torch.arange(num_keys, device=device)[None, :] < lens[:, None])
            key_mask = key_mask[:, None, None, :]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        groups.append(_DecodeGroup(
            rows=slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device),
            block_tables=metadata.block_tables.index_select(
                0, torch.tensor(members, device=device))[:, :num_blocks],
            num_keys=num_keys, key_mask=key_mask))
    return groups


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          is_causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D]."""
    # NOTE: SDPA wants [batch, heads, L, D]; without the batch dim, CPU SDPA silently takes
    # its O(L^2)-memory math path instead of the flash kernel (2-4x slower at 1k tokens).
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask,
                                         is_causal=is_causal, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | None = None,
                       causal_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one key set, with its log-sum-exp, in plain float32 math.

    q [Lq, Hq, D]; k, v [Lk, Hkv, D]. With causal_offset c, query i sees keys j <= c + i; None
    means all keys. Returns out [Lq, Hq, D] (q's dtype) and lse [Lq, Hq] (float32); a query
    that sees no key gets out 0 and lse -inf, so merging it is a no-op (see merge.py).
    Queries go in blocks of _LSE_QUERY_BLOCK rows, so scores stay [Hq, block, Lk].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    outs, lses = [], []
    for start in range(0, q.shape[0], _LSE_QUERY_BLOCK):
        qf = q[start:start + _LSE_QUERY_BLOCK].float().transpose(0, 1)  # [Hq, b, D]
        offset = None if causal_offset is None else causal_offset + start
        out, lse = _lse_block(qf, kf, vf, scale, offset)
        outs.append(out)
        lses.append(lse)
    if not outs:  # no queries
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)  # [Hq, Lq, D], [Hq, Lq]
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1).contiguous()


# Query rows per block of attention_with_lse: at 16k keys and 9 heads a block's fp32 scores
# take 9 * 2048 * 16k * 4 B = 1.2 GB instead of 9.7 GB for the whole 16k x 16k.
_LSE_QUERY_BLOCK = 2048


def _lse_block(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, scale: float,
               causal_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """qf [Hq, b, D], kf/vf [Hq, Lk, D] fp32 -> out [Hq, b, D], lse [Hq, b]."""
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, b, Lk]
    if causal_offset is not None:
        visible = torch.ones(qf.shape[1], kf.shape[1], dtype=torch.bool, device=qf.device)
        scores = scores.masked_fill(~visible.tril(causal_offset), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, b]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # -inf - -inf rows -> 0
    return torch.matmul(probs, vf), lse  # [Hq, b, D]
