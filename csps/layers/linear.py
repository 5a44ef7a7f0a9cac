"""Linear layers named for how tensor parallelism shards them (vLLM's names); each layer holds
only its rank's shard and has a `weight_loader(param, loaded_weight[, shard_id])` that narrows
the full checkpoint tensor to that shard (pure slicing: the collectives live in csps.parallel).

Shards are contiguous and as even as possible, larger first; attention splits by KV group so
head counts the TP size does not divide work. With tp_size 1 every layer is the plain linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from csps.layers.quantization import Int8Weight


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
        self.int8: Int8Weight | None = None  # set by quantization.quantize_model_int8_

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, input_size] -> [num_tokens, output_size]
        if self.int8 is not None:
            return self.int8.matmul(x)
        return linear(x, self.weight)


def shard_range(size: int, tp_rank: int, tp_size: int) -> range:
    """Rank tp_rank's contiguous share of `size` rows, as even as possible, larger shares first."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    base, extra = divmod(size, tp_size)
    start = tp_rank * base + min(tp_rank, extra)
    return range(start, start + base + (1 if tp_rank < extra else 0))


class _StackedColumnLinear(_LinearBase):
    """Column-parallel projections stacked on the output dim, each narrowed to this rank's rows.

    shards: shard_id -> (rows of that projection in the checkpoint, the rows this rank keeps).
    """

    def __init__(self, input_size: int, shards: dict[str | int, tuple[int, range]]) -> None:
        super().__init__(input_size, sum(len(rows) for _, rows in shards.values()))
        self.shards = shards
        self.shard_offsets: dict[str | int, tuple[int, int]] = {}  # shard_id -> (offset, size)
        offset = 0
        for shard_id, (_, rows) in shards.items():
            self.shard_offsets[shard_id] = (offset, len(rows))
            offset += len(rows)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor: split it into its shards
            full_sizes = [full for full, _ in self.shards.values()]
            if loaded_weight.shape[0] != sum(full_sizes):
                raise ValueError(f"fused tensor has {loaded_weight.shape[0]} rows, "
                                 f"expected {sum(full_sizes)}")
            for sid, part in zip(self.shards, loaded_weight.split(full_sizes), strict=True):
                self.weight_loader(param, part, sid)
            return
        if shard_id not in self.shards:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shards)}")
        full, rows = self.shards[shard_id]
        if loaded_weight.shape[0] != full:
            raise ValueError(f"shard {shard_id!r}: checkpoint has {loaded_weight.shape[0]} "
                             f"rows, expected {full}")
        offset, size = self.shard_offsets[shard_id]
        default_weight_loader(param.data.narrow(0, offset, size),
                              loaded_weight.narrow(0, rows.start, size))


class ColumnParallelLinear(_StackedColumnLinear):
    """Output dim sharded: [T, input_size] -> [T, len(output_range)] (this rank's columns)."""

    def __init__(self, input_size: int, output_size: int, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        self.output_range = shard_range(output_size, tp_rank, tp_size)
        super().__init__(input_size, {0: (output_size, self.output_range)})


class QKVParallelLinear(_StackedColumnLinear):
    """Fused q/k/v projection of this rank's heads: [T, hidden] -> [T, (Hq + 2 Hkv) * D] local.

    Rank r owns the KV heads kv_head_range and the query heads of their GQA groups
    (q_head_range). Shards "q", "k", "v" are the HF q_proj / k_proj / v_proj weights.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        if num_heads % num_kv_heads or tp_size > num_kv_heads:
            raise ValueError(f"need num_heads ({num_heads}) a multiple of num_kv_heads "
                             f"({num_kv_heads}) and tp_size ({tp_size}) <= num_kv_heads")
        group = num_heads // num_kv_heads
        self.kv_head_range = shard_range(num_kv_heads, tp_rank, tp_size)
        self.q_head_range = range(self.kv_head_range.start * group,
                                  self.kv_head_range.stop * group)
        self.num_heads, self.num_kv_heads = len(self.q_head_range), len(self.kv_head_range)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim

        def rows(heads: range) -> range:
            return range(heads.start * head_dim, heads.stop * head_dim)

        super().__init__(hidden_size, {"q": (num_heads * head_dim, rows(self.q_head_range)),
                                       "k": (num_kv_heads * head_dim, rows(self.kv_head_range)),
                                       "v": (num_kv_heads * head_dim, rows(self.kv_head_range))})


class MergedColumnParallelLinear(_StackedColumnLinear):
    """Projections sharing an input, each column-sharded then stacked (gate = 0, up = 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__(input_size, {i: (size, shard_range(size, tp_rank, tp_size))
                                      for i, size in enumerate(output_sizes)})


class RowParallelLinear(_LinearBase):
    """Input dim sharded (o_proj, down_proj): [T, len(input_range)] -> [T, output_size] partial.

    NOTE: the partial outputs of the TP ranks must be summed (all-reduce or, with sequence
    parallelism, reduce-scatter), which csps.parallel.sp_tp does. input_range defaults to the
    even split; o_proj passes the columns of its QKVParallelLinear's query heads.
    """

    def __init__(self, input_size: int, output_size: int, tp_rank: int = 0, tp_size: int = 1,
                 input_range: range | None = None) -> None:
        self.input_range = (shard_range(input_size, tp_rank, tp_size) if input_range is None
                            else input_range)
        self.full_input_size = input_size
        super().__init__(len(self.input_range), output_size)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.dim() != 2 or loaded_weight.shape[1] != self.full_input_size:
            raise ValueError(f"checkpoint tensor {tuple(loaded_weight.shape)} does not have "
                             f"{self.full_input_size} input columns")
        default_weight_loader(param, loaded_weight.narrow(1, self.input_range.start,
                                                          len(self.input_range)))


# The unsharded names the model used before TP (tp_size 1 is the default).
QKVLinear = QKVParallelLinear
MergedColumnLinear = MergedColumnParallelLinear
RowLinear = RowParallelLinear
