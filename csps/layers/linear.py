"""Linear layers named for how tensor parallelism will shard them; each layer has a
`weight_loader(param, loaded_weight[, shard_id])` that copies a checkpoint tensor into place.

For now every layer is unsharded (tp_size 1): the loaders only place fused shards (q/k/v,
gate/up) and check shapes. Sharding will narrow the loaded tensor in these same loaders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's CPU inner product handles here (none without mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return ()
    working = []
    for dtype in (torch.float32, torch.bfloat16):
        try:
            x, w = torch.ones(2, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype)
            if torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                           F.linear(x, w)):
                working.append(dtype)
        except (AttributeError, RuntimeError):
            pass
    return tuple(working)


# NOTE: on CPU, oneDNN's inner product runs decode-sized matmuls ([1..16, K] x [N, K]^T)
# 1.3-2.5x faster than F.linear's MKL sgemm on the 2-core dev machines, and large prefill
# ones ~10% faster, on the same dense weight (no copy). F.linear stays the fallback and the
# reference (tests compare them). Set ONEDNN_LINEAR = False to use F.linear everywhere.
ONEDNN_LINEAR = True
_ONEDNN_DTYPES = _onednn_linear_dtypes()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out] = x weight^T, weight [out, in]; no bias."""
    if (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
            and weight.dtype == x.dtype):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into `param` (casting dtype/device); shapes must match."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, "
                         f"checkpoint {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


class _LinearBase(nn.Module):
    """y = x W^T with W: [output_size, input_size]; no bias (Llama has none)."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size))

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, input_size] -> [num_tokens, output_size]
        return linear(x, self.weight)


class _FusedColumnLinear(_LinearBase):
    """Several column-parallel projections stacked on the output dim, loaded shard by shard."""

    def __init__(self, input_size: int, output_sizes: dict[str | int, int]) -> None:
        super().__init__(input_size, sum(output_sizes.values()))
        self.shard_offsets: dict[str | int, tuple[int, int]] = {}  # shard_id -> (offset, size)
        offset = 0
        for shard_id, size in output_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            default_weight_loader(param, loaded_weight)
            return
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of "
                             f"{list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        default_weight_loader(param.data.narrow(0, offset, size), loaded_weight)


class QKVLinear(_FusedColumnLinear):
    """Fused q/k/v projection: [T, hidden] -> [T, (num_heads + 2 * num_kv_heads) * head_dim].

    Shards "q", "k", "v" are the HF q_proj / k_proj / v_proj weights.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size})


class MergedColumnLinear(_FusedColumnLinear):
    """Projections sharing an input, stacked: shard i is output_sizes[i] rows (gate=0, up=1)."""

    def __init__(self, input_size: int, output_sizes: list[int]) -> None:
        super().__init__(input_size, dict(enumerate(output_sizes)))


class RowLinear(_LinearBase):
    """Projection whose input dim tensor parallelism will shard (o_proj, down_proj).

    NOTE: once sharded, its partial outputs need an all-reduce, done by `csps.parallel`.
    """
