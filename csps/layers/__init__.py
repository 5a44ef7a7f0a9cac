"""Model building blocks: linear, norm, rotary, embedding and activation layers."""

from csps.layers.activation import SiluAndMul
from csps.layers.embedding import LMHead, VocabEmbedding
from csps.layers.linear import (
    ColumnParallelLinear,
    MergedColumnLinear,
    MergedColumnParallelLinear,
    QKVLinear,
    QKVParallelLinear,
    RowLinear,
    RowParallelLinear,
    default_weight_loader,
    shard_range,
)
from csps.layers.norm import RMSNorm
from csps.layers.rotary import RotaryEmbedding, apply_rotary_emb

__all__ = [
    "ColumnParallelLinear", "LMHead", "MergedColumnLinear", "MergedColumnParallelLinear",
    "QKVLinear", "QKVParallelLinear", "RMSNorm", "RotaryEmbedding", "RowLinear",
    "RowParallelLinear", "SiluAndMul", "VocabEmbedding", "apply_rotary_emb",
    "default_weight_loader", "shard_range",
]
