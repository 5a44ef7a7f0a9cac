"""ModelShape: the dimensions a cost model needs, read from a Hugging Face config.json dict.

Kept apart from the loader's LlamaArchConfig so cost models stay torch-free and can describe
models that are not on disk (the simulator's Llama-3-70B, say).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int  # MLP inner width (gate and up each)
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 2  # bytes per weight / activation / KV element (fp32 on CPU: 4)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf_dict(cls, config: dict, name: str = "", dtype_bytes: int = 2) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(name=name or config.get("_name_or_path", "model"),
                   num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                   intermediate_size=config["intermediate_size"], num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   vocab_size=config["vocab_size"], dtype_bytes=dtype_bytes)

    @classmethod
    def from_config_file(cls, path: str | Path, dtype_bytes: int = 2) -> ModelShape:
        path = Path(path)
        name = path.parent.name if path.stem == "config" else path.stem
        return cls.from_hf_dict(json.loads(path.read_text()), name=name,
                                dtype_bytes=dtype_bytes)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of one decoder layer's projections and MLP (norms are negligible)."""
        attn = self.hidden_size * (2 * self.q_width + 2 * self.kv_width)  # q, o, k, v
        return attn + 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    @property
    def linear_flops_per_token(self) -> int:
        """FLOPs of the dense layers for one token through every decoder layer."""
        return 2 * self.linear_params_per_layer * self.num_layers

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs of one (query, key) pair over all heads and layers (QK^T and PV)."""
        return 4 * self.q_width * self.num_layers

    @property
    def lm_head_flops(self) -> int:
        return 2 * self.hidden_size * self.vocab_size

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes of one token over all layers."""
        return 2 * self.kv_width * self.dtype_bytes * self.num_layers

    @property
    def weight_bytes(self) -> int:
        return (self.linear_params_per_layer * self.num_layers
                + 2 * self.hidden_size * self.vocab_size) * self.dtype_bytes
