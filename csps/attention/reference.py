"""Plain-torch attention over a paged KV cache: the CPU oracle for every faster backend.

Prefill without a cached prefix is causal SDPA on the new keys; chunked prefill after a prefix
gathers the request's blocks and masks with the position offset; all single-token decodes of a
batch share one gather and one SDPA call. `attention_with_lse` is the partial-softmax twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csps.attention.backend import AttentionBackend
from csps.attention.metadata import AttentionMetadata, DecodeBatch
from csps.kvcache.paged_cache import KVCache


class ReferenceAttentionBackend(AttentionBackend):
    """Not thread-safe: one instance serves one model's layers, one forward at a time."""

    name = "reference"

    def __init__(self) -> None:
        # Reused gather buffers (flat). NOTE: fresh multi-MB allocations are page-faulted in
        # on every use, which on the dev VMs costs more than the gather itself.
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None

    def _gather(self, kv_cache: KVCache,
                block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        numel = block_ids.numel() * kv_cache.k_cache[0].numel()
        ws = self._workspace
        if (ws is None or ws[0].numel() < numel or ws[0].dtype != kv_cache.k_cache.dtype
                or ws[0].device != kv_cache.k_cache.device):
            ws = tuple(torch.empty(numel, dtype=kv_cache.k_cache.dtype,
                                   device=kv_cache.k_cache.device) for _ in range(2))
            self._workspace = ws
        return kv_cache.gather_blocks(block_ids, out=ws)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata,
                scale: float | None = None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if kv_cache is not None:
            if metadata.slot_mapping is None:
                raise ValueError("a kv_cache needs metadata built with slot_mapping")
            kv_cache.write_slots(k, v, metadata.slot_mapping)
        elif any(metadata.num_computed_tokens):
            raise ValueError("requests with a cached prefix need a kv_cache")
        decode = metadata.decode_batch if kv_cache is not None else None
        if decode is not None and len(decode.request_indices) == metadata.num_reqs:
            return self._decode_attention(q, kv_cache, decode, scale)  # a pure decode batch
        out = torch.empty_like(q)  # [T, Hq, D]
        starts = metadata.query_starts
        for r, num_computed in enumerate(metadata.num_computed_tokens):
            start, end = starts[r], starts[r + 1]
            if num_computed == 0:
                out[start:end] = _sdpa(q[start:end], k[start:end], v[start:end], scale,
                                       is_causal=True)
            elif end - start > 1:
                out[start:end] = self._prefix_attention(q[start:end], kv_cache, metadata, r,
                                                        scale)
        if decode is not None:
            out.index_copy_(0, decode.token_rows,
                            self._decode_attention(q.index_select(0, decode.token_rows),
                                                   kv_cache, decode, scale))
        return out


    def _prefix_attention(self, q: torch.Tensor, kv_cache: KVCache,
                          metadata: AttentionMetadata, r: int, scale: float) -> torch.Tensor:
        """Chunked prefill of request r: q [n, Hq, D] at positions c..c+n-1 over keys 0..c+n-1."""
        num_computed, seq_len = metadata.num_computed_tokens[r], metadata.seq_lens[r]
        num_blocks = -(-seq_len // kv_cache.block_size)
        keys, values = self._gather(kv_cache, metadata.block_tables[r, :num_blocks])
        # query i (position c + i) sees key j iff j <= c + i: a lower triangle shifted by c.
        mask = torch.ones(q.shape[0], seq_len, dtype=torch.bool, device=q.device)
        return _sdpa(q, keys[:seq_len], values[:seq_len], scale, mask=mask.tril(num_computed))

    def _decode_attention(self, q: torch.Tensor, kv_cache: KVCache, decode: DecodeBatch,
                          scale: float) -> torch.Tensor:
        """q [Rd, Hq, D], one query per request -> [Rd, Hq, D]: one gather, one SDPA call."""
        num_reqs, num_heads, head_dim = q.shape
        keys, values = self._gather(kv_cache, decode.block_tables)  # [Rd, B * bs, Hkv, D]
        keys, values = keys[:, :decode.num_keys], values[:, :decode.num_keys]
        num_kv_heads = keys.shape[2]
        # NOTE: a single query needs no causal mask, so the query heads sharing a KV head can
        # be folded into the query-length axis: [Rd, Hkv, group, D] against [Rd, Hkv, L, D].
        # That avoids repeating K/V per query head and gives SDPA a larger matrix per call.
        grouped = q.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys.transpose(1, 2),
                                             values.transpose(1, 2), attn_mask=decode.key_mask,
                                             scale=scale)
        return out.reshape(num_reqs, num_heads, head_dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          is_causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    # q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D]; SDPA wants heads first.
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=True)
    return out.transpose(0, 1)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | None = None,
                       causal_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one key set, with its log-sum-exp, in plain float32 math.

    q [Lq, Hq, D]; k, v [Lk, Hkv, D]. With causal_offset c, query i sees keys j <= c + i; None
    means all keys. Returns out [Lq, Hq, D] (q's dtype) and lse [Lq, Hq] (float32); a query
    that sees no key gets out 0 and lse -inf, so merging it is a no-op (see merge.py).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
    if causal_offset is not None:
        visible = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(~visible.tril(causal_offset), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # -inf - -inf rows -> 0
    out = torch.matmul(probs, vf)  # [Hq, Lq, D]
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1).contiguous()
