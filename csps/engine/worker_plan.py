"""What every worker of a deployment is built with: device, dtype, the KV pool's size in blocks
(the memory budget over the bytes one token's K/V takes on a rank, its TP share of the KV
heads), and the parallel and attention settings. One dict, the executors' worker kwargs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from csps.config import EngineConfig
from csps.engine.worker import resolve_device, resolve_dtype
from csps.kvcache.capacity import kv_bytes_per_token, plan_num_blocks
from csps.layers.linear import shard_range
from csps.scheduler.deployment import places_kv_per_rank


def plan_workers(config: EngineConfig, arch, model_dir: Path,
                 max_model_len: int) -> dict[str, Any]:
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    parallel = config.parallel
    kv_heads_per_rank = max(len(shard_range(arch.num_key_value_heads, r,
                                            parallel.tensor_parallel_size))
                            for r in range(parallel.tensor_parallel_size))
    bytes_per_token = kv_bytes_per_token(arch.num_hidden_layers, kv_heads_per_rank,
                                         arch.head_dim, dtype)
    sp_ranks = (parallel.sequence_parallel_size
                if places_kv_per_rank(config.scheduler.policy) else 1)
    num_blocks = plan_num_blocks(config.cache.kv_cache_memory_bytes, config.cache.block_size,
                                 bytes_per_token, max_model_len, num_ranks=sp_ranks)
    return dict(
        model_dir=model_dir, arch=arch, dtype=dtype, device=device,
        num_blocks=num_blocks, block_size=config.cache.block_size, seed=config.model.seed,
        sp_attention=parallel.sp_attention, sp_decode=parallel.sp_decode,
        csa_levels=parallel.resolved_csa_levels, csa_far_queries=parallel.csa_far_queries,
        csa_micro_batch=parallel.csa_micro_batch,
        attention_backend=config.model.attention_backend,
        quantization=config.model.quantization)
