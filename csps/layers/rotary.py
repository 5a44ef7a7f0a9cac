"""Rotary position embedding (RoPE, Su et al. 2021) in HF Llama's half-rotation layout.

Frequency scaling from the config's rope_scaling: none/"default", "linear" (position
interpolation) and "llama3" (Llama 3.1 wavelength-banded scaling). cos/sin are computed once per
forward from the positions, in float32, so there is no length limit and no cache to grow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type_of(rope_scaling: dict | None) -> str:
    """The rope type named by an HF rope_scaling/rope_parameters dict ("default" when None)."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Wavelengths longer than the original context / low_freq_factor are slowed by `factor`,
    # shorter than context / high_freq_factor are kept, and the band between is interpolated.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 on CPU; ValueError for unsupported types."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base ** exponents)  # [head_dim // 2]
    rope_type = rope_type_of(rope_scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> rotated x; cos, signed_sin [T, 1, D] from RotaryEmbedding.forward.

    The half-rotation x * cos + cat(-x2, x1) * sin is computed as x * cos + roll(x) *
    signed_sin, where signed_sin = cat(-sin1, sin2): the same products, two ops fewer.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, signed_sin), each [T, 1, head_dim]; once per model forward."""

    def __init__(self, head_dim: int, base: float, rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        # NOTE: a plain attribute, not a buffer: it stays float32 when the model is cast to
        # bf16, and survives meta-device construction (it is created on CPU explicitly).
        self.inv_freq = compute_inv_freq(head_dim, base, rope_scaling)  # [head_dim // 2]

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, head_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)[:, None, :]  # [T, 1, head_dim]
        signed_sin = torch.cat((-sin, sin), dim=-1)[:, None, :]  # [T, 1, head_dim]
        return cos.to(dtype), signed_sin.to(dtype)
