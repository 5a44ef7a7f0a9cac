"""Worker-side paged KV cache: per-layer K/V tensors, slot writes, block gathers, sizing.

Layout (vLLM's): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]. A token's
slot is block_id * block_size + offset; the block bookkeeping lives in kvcache/block_pool.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCache:
    """One layer's keys and values."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]

    def __post_init__(self) -> None:
        if self.k_cache.shape != self.v_cache.shape or self.k_cache.dim() != 4:
            raise ValueError(f"k/v caches must share a 4-d shape, got "
                             f"{tuple(self.k_cache.shape)} and {tuple(self.v_cache.shape)}")

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[0]

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    def write_slots(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v [T, num_kv_heads, head_dim] at slots slot_mapping [T] (int64)."""
        num_kv_heads, head_dim = self.k_cache.shape[2:]
        self.k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        self.v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)

    def read_slots(self, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [T, num_kv_heads, head_dim] (copies) at slots slot_mapping [T] (int64)."""
        num_kv_heads, head_dim = self.k_cache.shape[2:]
        return (self.k_cache.view(-1, num_kv_heads, head_dim).index_select(0, slot_mapping),
                self.v_cache.view(-1, num_kv_heads, head_dim).index_select(0, slot_mapping))

    def gather_blocks(self, block_ids: torch.Tensor,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids [..., B] -> k, v [..., B * block_size, num_kv_heads, head_dim] (copies).

        `out`, two flat buffers of at least that many elements, avoids fresh allocations.
        """
        lead = block_ids.shape[:-1]
        flat = block_ids.reshape(-1)
        block_shape = self.k_cache.shape[1:]
        shape = (*lead, block_ids.shape[-1] * self.block_size, *block_shape[1:])
        if out is None:
            return (self.k_cache.index_select(0, flat).view(shape),
                    self.v_cache.index_select(0, flat).view(shape))
        numel = flat.numel() * self.k_cache[0].numel()
        k_out = out[0][:numel].view(flat.numel(), *block_shape)
        v_out = out[1][:numel].view(flat.numel(), *block_shape)
        torch.index_select(self.k_cache, 0, flat, out=k_out)
        torch.index_select(self.v_cache, 0, flat, out=v_out)
        return k_out.view(shape), v_out.view(shape)


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[KVCache]:
    """One zero-filled KVCache per layer, for the engine to pass to `model.forward`."""
    if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) < 1:
        raise ValueError("all KV cache dimensions must be positive")
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [KVCache(torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]
