"""Attention: batch metadata, the backend interface and registry, the reference backend."""

from csps.attention.backend import (
                                    AttentionBackend,
                                    available_attention_backends,
                                    get_attention_backend,
                                    register_attention_backend,
)
from csps.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "available_attention_backends",
           "get_attention_backend", "register_attention_backend"]
