"""Gated activation of the Llama MLP: SiLU(gate) * up on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[num_tokens, 2 * d] -> [num_tokens, d]: silu(x[:, :d]) * x[:, d:]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
