"""Llama-family decoder (Touvron et al. 2023) in paper order, over a flat batch of tokens.

embedding -> N x [RMSNorm, self-attention with RoPE and GQA, residual, RMSNorm, SiLU-gated MLP,
residual] -> final RMSNorm -> LM head. The model knows nothing about requests: the attention
backend reads positions in the KV cache from the AttentionMetadata passed to `forward`.
Given a TensorParallelContext, the decoder runs SP-TP (algorithms.md §2.1): sharded heads and
MLP columns, the token sequence split over the TP ranks between the projections.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from csps.attention.backend import AttentionBackend
from csps.attention.metadata import AttentionMetadata
from csps.kvcache.paged_cache import KVCache
from csps.layers import (
    LMHead,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabEmbedding,
    apply_rotary_emb,
    default_weight_loader,
)
from csps.model.arch_config import LlamaArchConfig

if TYPE_CHECKING:  # the model only calls the context it is handed (no torch.distributed here)
    from csps.parallel.sp_tp import TensorParallelContext

# HF checkpoint name fragment -> (our fused parameter fragment, shard id)
_STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def _tp_coords(tp: TensorParallelContext | None) -> tuple[int, int]:
    return (0, 1) if tp is None else (tp.tp_rank, tp.tp_size)


class LlamaAttention(nn.Module):
    """Under TP: this rank's KV heads and their query heads; o_proj returns partial sums."""

    def __init__(self, config: LlamaArchConfig, attn_backend: AttentionBackend,
                 tp: TensorParallelContext | None = None) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim,
                                          config.num_attention_heads,
                                          config.num_key_value_heads, *_tp_coords(tp))
        self.num_heads = self.qkv_proj.num_heads  # local query heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # local KV heads
        q_heads = self.qkv_proj.q_head_range
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, *_tp_coords(tp),
            input_range=range(q_heads.start * self.head_dim, q_heads.stop * self.head_dim))
        self.attn_backend = attn_backend

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 * Hkv) * D]
        q_and_k, v = qkv.split([self.qkv_proj.q_size + self.qkv_proj.kv_size,
                                self.qkv_proj.kv_size], dim=-1)
        # RoPE on q and k at once: [T, Hq + Hkv, D], then split by heads.
        q_and_k = apply_rotary_emb(q_and_k.view(num_tokens, self.num_heads + self.num_kv_heads,
                                                   self.head_dim), cos, sin)
        q, k = q_and_k.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        out = self.attn_backend.forward(q, k, v, kv_cache, metadata, scale=self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, config: LlamaArchConfig, tp: TensorParallelContext | None = None) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size],
                                                       *_tp_coords(tp))
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(size, config.hidden_size, *_tp_coords(tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaArchConfig, attn_backend: AttentionBackend,
                 tp: TensorParallelContext | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, attn_backend, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None, metadata: AttentionMetadata,
                sizes: Sequence[int] | None = None) -> torch.Tensor:
        """x [T, H], or under SP-TP this rank's token slice [sizes[tp_rank], H]; same out."""
        h = self._gather(self.input_layernorm(x), sizes)  # [T, H]
        x = x + self._scatter(self.self_attn(h, cos, sin, kv_cache, metadata), sizes)
        h = self._gather(self.post_attention_layernorm(x), sizes)  # [T, H]
        return x + self._scatter(self.mlp(h), sizes)

    def _gather(self, x_local: torch.Tensor, sizes: Sequence[int] | None) -> torch.Tensor:
        return x_local if self.tp is None else self.tp.gather(x_local, sizes)

    def _scatter(self, partial: torch.Tensor, sizes: Sequence[int] | None) -> torch.Tensor:
        return partial if self.tp is None else self.tp.reduce_scatter(partial, sizes)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaArchConfig, attn_backend: AttentionBackend,
                 tp: TensorParallelContext | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attn_backend, tp)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache] | None, metadata: AttentionMetadata) -> torch.Tensor:
        # NOTE: under SP-TP every TP rank gets the whole batch, embeds only its token slice
        # (sizes), and the final hidden states are all-gathered for the (replicated) LM head.
        sizes = None if self.tp is None else self.tp.token_split(input_ids.shape[0])
        local_ids = input_ids if sizes is None else input_ids[self.tp.local_rows(sizes)]
        x = self.embed_tokens(local_ids)  # [T, H], or [sizes[tp_rank], H]
        cos, sin = self.rotary_emb(positions, x.dtype)  # each [T, 1, D]: attention sees all T
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if kv_caches is None else kv_caches[i], metadata, sizes)
        x = self.norm(x)
        return x if self.tp is None else self.tp.gather(x, sizes)  # [T, H]


class LlamaForCausalLM(nn.Module):
    """Llama decoder + LM head. Build with a config and an attention backend instance; with a
    TensorParallelContext (tp) the decoder holds this TP rank's shard and runs SP-TP."""

    def __init__(self, config: LlamaArchConfig, attn_backend: AttentionBackend,
                 tp: TensorParallelContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, attn_backend, tp)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_embedding=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache] | None, attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids [T], positions [T] (int64) -> final hidden states [T, hidden_size].

        Tokens are grouped by request as attn_metadata describes; kv_caches holds one KVCache
        per layer (written in place) or is None for cache-free prefill from position 0. The
        caller owns torch.inference_mode().
        """
        if kv_caches is not None and len(kv_caches) != len(self.model.layers):
            raise ValueError(f"need {len(self.model.layers)} KV caches, got {len(kv_caches)}")
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] (rows to sample from) -> logits [N, vocab_size], float32."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the parameters; returns the parameter names filled.

        q/k/v and gate/up land in fused parameters through each one's weight_loader.
        Raises ValueError on an unknown name, a shape mismatch, or a parameter left unloaded.
        """
        params = dict(self.named_parameters())
        loaded: dict[str, set] = {}
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the head as well
            name, shard_id = _to_param_name(hf_name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter here")
            param = params[name]
            # NOTE: loaders live on the owning layer, not as parameter attributes, because
            # meta-device construction + to_empty() replaces the parameter objects.
            owner = self.get_submodule(name.rpartition(".")[0])
            weight_loader = getattr(owner, "weight_loader", None)
            if weight_loader is None:
                default_weight_loader(param, tensor)
            elif shard_id is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard_id)
            loaded.setdefault(name, set()).add(shard_id)
        missing = [n for n in params if not _is_complete(n, loaded.get(n))]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:4]}")
        return set(loaded)


def _to_param_name(hf_name: str) -> tuple[str, str | int | None]:
    for hf_fragment, (fragment, shard_id) in _STACKED_PARAMS.items():
        if hf_fragment in hf_name:
            return hf_name.replace(hf_fragment, fragment), shard_id
    return hf_name, None


def _is_complete(name: str, shards: set | None) -> bool:
    if not shards:
        return False
    if ".qkv_proj." in name:
        return None in shards or {"q", "k", "v"} <= shards
    if ".gate_up_proj." in name:
        return None in shards or {0, 1} <= shards
    return True
