"""Merge partial attention results computed over disjoint key sets (SP decode, CSA, ring).

With lse_i the log-sum-exp of the scores over key set i: LSE = logsumexp_i(lse_i) and
o = sum_i exp(lse_i - LSE) * o_i, which equals attention over the union of the key sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_attn_states(outs: Sequence[torch.Tensor],
                      lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """outs: N x [T, H, D]; lses: N x [T, H] -> (out [T, H, D] in outs' dtype, lse [T, H] fp32).

    Computed in float32. A part with lse -inf (it saw no key) contributes nothing; if no part
    saw a key, out is 0 and lse is -inf.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"need as many outs as lses, at least one; got {len(outs)}, {len(lses)}")
    lse_stack = torch.stack([lse.float() for lse in lses])  # [N, T, H]
    lse_max = lse_stack.amax(dim=0)  # [T, H]
    # NOTE: shift by a finite max so exp never sees inf - inf; all -inf rows shift by 0.
    lse_max = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    weights = torch.exp(lse_stack - lse_max)  # [N, T, H], 0 for parts with no keys
    total = weights.sum(dim=0)  # [T, H]
    merged_lse = torch.log(total) + lse_max  # -inf where total == 0
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for weight, part in zip(weights, outs, strict=True):
        out += (weight / safe_total).unsqueeze(-1) * part.float()
    return out.to(outs[0].dtype), merged_lse
