"""The AttentionBackend interface and a registry of implementations by name.

Backends (reference, flash, and the sequence-parallel Ulysses / ring / CSA ones) all take the
same flat q, k, v and AttentionMetadata, so the model never knows which one runs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from csps.attention.metadata import AttentionMetadata
    from csps.kvcache.paged_cache import KVCache


class AttentionBackend(ABC):
    """Causal multi-head attention over a flat batch, with an optional paged KV cache."""

    name: str = ""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata,
                scale: float | None = None) -> torch.Tensor:
        """Attention of this batch's queries over each request's keys, new and cached.

        q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (RoPE already applied),
        rows grouped by request as metadata.query_start_loc says. num_heads must be a multiple
        of num_kv_heads (GQA). The query at position p of a request attends to that request's
        keys at positions 0..p. scale defaults to head_dim ** -0.5.

        With a kv_cache, the backend first writes k, v to metadata.slot_mapping, then reads
        each request's earlier keys through metadata.block_tables; without one, every request
        must start at position 0 (metadata.num_computed_tokens all 0).

        Called once per layer by the model, inside the caller's torch.inference_mode().
        Returns [T, num_heads, head_dim] in q's dtype. Raises ValueError when the metadata
        asks for a cached prefix but no kv_cache is given.
        """


# Built-in backends, imported on first use so optional GPU dependencies never break import.
_BUILTIN: dict[str, str] = {"reference": "csps.attention.reference:ReferenceAttentionBackend",
                            "paged": "csps.attention.paged:PagedAttentionBackend",
                            "paged_torch": "csps.attention.paged:PagedTorchAttentionBackend"}
_REGISTERED: dict[str, type[AttentionBackend]] = {}


def register_attention_backend(name: str, backend_cls: type[AttentionBackend]) -> None:
    """Make `backend_cls` available as get_attention_backend(name)."""
    if not (isinstance(backend_cls, type) and issubclass(backend_cls, AttentionBackend)):
        raise ValueError(f"{backend_cls!r} is not an AttentionBackend subclass")
    _REGISTERED[name] = backend_cls


def available_attention_backends() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_attention_backend(name: str, **kwargs) -> AttentionBackend:
    """A new backend instance by name; ValueError listing the known names otherwise."""
    if name not in _REGISTERED and name in _BUILTIN:
        module_name, class_name = _BUILTIN[name].split(":")
        _REGISTERED[name] = getattr(importlib.import_module(module_name), class_name)
    if name not in _REGISTERED:
        raise ValueError(f"unknown attention backend {name!r}; available: "
                         f"{available_attention_backends()}")
    return _REGISTERED[name](**kwargs)
