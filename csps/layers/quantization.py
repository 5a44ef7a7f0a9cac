"""Weight-only int8 linear layers (--quantization int8): per-output-row scales, bf16 activations.

quantize_int8 turns a [N, K] weight into int8 rows and one scale per row (symmetric, absmax /
127). Decode-sized inputs (a few rows) run torch's fused CPU kernel _weight_int8pack_mm, which
reads a quarter of fp32's weight bytes; larger inputs (prefill) dequantize the weight to the
activations' dtype and take the dense path, which beats that kernel there (measured in
docs/benchmarks.md, "Decode fast path"). Slow twin: Int8Weight.dequantize() with F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8")

# NOTE: on the 2-core dev machine _weight_int8pack_mm beat bf16 oneDNN at 1 row (1.3-2.5x) and
# lost from 16 rows on (2x slower); dequantize-then-dense wins past a few rows.
_FUSED_MAX_ROWS = 4
_FUSED = getattr(torch, "_weight_int8pack_mm", None)


@dataclass(frozen=True)
class Int8Weight:
    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N], the activations' dtype

    def dequantize(self) -> torch.Tensor:
        """[N, K] in the scales' dtype: qweight * scale per row."""
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] = x W^T, W the dequantized weight."""
        from csps.layers.linear import linear  # NOTE: linear.py imports this module

        rows = x.numel() // x.shape[-1]
        # NOTE: the fused kernel is fast with bf16 activations only (10x slower with fp32)
        if (_FUSED is not None and x.device.type == "cpu" and rows <= _FUSED_MAX_ROWS
                and x.dtype == torch.bfloat16 == self.scales.dtype):
            flat = x.reshape(rows, x.shape[-1])
            return _FUSED(flat, self.qweight, self.scales).view(*x.shape[:-1], -1)
        return linear(x, self.dequantize())


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """weight [N, K] (float) -> its int8 rows and per-row scales in weight's dtype."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
    qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(qweight.contiguous(), scales.to(weight.dtype))


def reference_int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """The slow twin: the dequantized weight through plain F.linear."""
    return F.linear(x, weight.dequantize())


def quantize_model_int8_(model: torch.nn.Module) -> int:
    """Quantize, in place, every layer that declares an `int8` slot (linear layers, the LM
    head); their float weights are dropped (a tied head keeps the embedding's). Returns how
    many layers were quantized."""
    count = 0
    for module in model.modules():
        if not hasattr(module, "int8"):
            continue
        weight = module.tied_embedding[0].weight if getattr(module, "is_tied", False) \
            else module.weight
        module.int8 = quantize_int8(weight.detach())
        if not getattr(module, "is_tied", False):
            module.weight = None
        count += 1
    return count
