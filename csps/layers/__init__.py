"""Model building blocks: linear, norm, rotary, embedding and activation layers."""

from csps.layers.activation import SiluAndMul
from csps.layers.embedding import LMHead, VocabEmbedding
from csps.layers.linear import MergedColumnLinear, QKVLinear, RowLinear, default_weight_loader
from csps.layers.norm import RMSNorm
from csps.layers.rotary import RotaryEmbedding, apply_rotary_emb

__all__ = [
    "LMHead", "MergedColumnLinear", "QKVLinear", "RMSNorm", "RotaryEmbedding", "RowLinear",
    "SiluAndMul", "VocabEmbedding", "apply_rotary_emb", "default_weight_loader",
]
