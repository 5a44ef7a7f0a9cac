"""RMSNorm (Zhang & Sennrich, 2019) as Llama uses it: normalise in float32, then scale in the
input dtype."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), over the last dimension."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [hidden_size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden_size] (any leading dims)
        input_dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        # NOTE: cast back before scaling, as the reference implementation does, so bf16/fp16
        # results match it bit for bit.
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(input_dtype)
