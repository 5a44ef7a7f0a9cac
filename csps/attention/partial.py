"""partial_attention: attention over one key set plus its log-sum-exp, through a fused kernel.

The fast twin of reference.attention_with_lse (plain fp32 math, the oracle): the parts that
ring attention and q-move decode merge with merge.py. On CPU it calls PyTorch's flash-attention
kernel, which returns the LSE too (~10x faster than materialising the scores at 2k x 2k, and no
[H, Lq, Lk] buffer); elsewhere, and for masks the kernel cannot express, it falls back to the
reference. Equal to it within 1e-5 (tests/test_attention.py).
"""

from __future__ import annotations

import torch

from csps.attention.reference import attention_with_lse

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None,
                      causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> (out [Lq, Hq, D] in q's dtype, lse [Lq, Hq] fp32).

    causal: query i sees keys j <= i (q and k start at the same position, Lq == Lk);
    otherwise every query sees every key.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 1 and k.shape[0] > 0:  # one decode query: no copies of K/V at all
        return _single_query(q, k, v, scale)
    usable = (_FLASH_CPU is not None and q.device.type == "cpu" and k.shape[0] > 0
              and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == q.dtype
              and (not causal or q.shape[0] == k.shape[0]))
    if not usable:
        return attention_with_lse(q, k, v, scale=scale, causal_offset=0 if causal else None)
    group = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(group, dim=1) if group > 1 else k  # [Lk, Hq, D]
    values = v.repeat_interleave(group, dim=1) if group > 1 else v
    out, lse = _FLASH_CPU(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                          values.transpose(0, 1)[None], 0.0, causal, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()  # [Lq, Hq, D], [Lq, Hq]


def _single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, Hq, D] over k/v [L, Hkv, D]: GQA as a batched matmul per KV head (no
    repeat_interleave of the keys, which costs more than the attention at long contexts)."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group = num_heads // num_kv_heads
    qg = q.view(num_kv_heads, group, head_dim).float()  # [Hkv, g, D]
    scores = torch.matmul(qg, k.permute(1, 2, 0).float()) * scale  # [Hkv, g, L]
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, g]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.transpose(0, 1).float())  # [Hkv, g, D]
    return (out.reshape(1, num_heads, head_dim).to(q.dtype),
            lse.reshape(1, num_heads))
