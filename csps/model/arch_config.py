"""LlamaArchConfig: the shape of a Llama-family checkpoint, read from an HF config.json dict.

Accepts both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`)
spellings; rejects features the Llama decoder here does not implement, with ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csps.layers.rotary import SUPPORTED_ROPE_TYPES, rope_type_of


@dataclass(frozen=True)
class LlamaArchConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # MLP inner width (gate and up each)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means GQA
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # with a "rope_type" key; None for plain RoPE
    max_position_embeddings: int = 2048  # trained context length, in tokens
    tie_word_embeddings: bool = False  # LM head reuses the token embedding
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architectures: tuple[str, ...] = field(default=("LlamaForCausalLM",))

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}; "
                             f"supported: {SUPPORTED_ROPE_TYPES}")

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (empty when unset)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else self.eos_token_id

    @classmethod
    def from_hf_dict(cls, config: dict) -> LlamaArchConfig:
        """Build from a parsed config.json; ValueError naming what is missing or unsupported."""
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in config]
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        _check_supported(config)
        rope_theta, rope_scaling = _rope_from_hf(config)
        num_heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            architectures=tuple(config.get("architectures") or ("LlamaForCausalLM",)),
        )


def _check_supported(config: dict) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; only silu")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError("attention_bias / mlp_bias are not supported by the Llama decoder")
    if config.get("sliding_window") not in (None, 0):
        raise ValueError(f"sliding-window attention ({config['sliding_window']}) is not "
                         "supported")


def _rope_from_hf(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either spelling."""
    params = config.get("rope_parameters")
    if params:  # transformers 5.x: one dict holds theta and the scaling
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:  # transformers 4.x
        theta = float(config.get("rope_theta", 10000.0))
        scaling = dict(config.get("rope_scaling") or {})
    rope_type = rope_type_of(scaling)
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    return theta, scaling
