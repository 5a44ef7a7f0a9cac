"""The simulated deployment: how many KV blocks each rank gets, and one Scheduler per replica.

On a GPU cluster a rank (one TP member of one SP rank) keeps `gpu_memory_utilization` of its
memory, less its 1/T of the weights and an activation reserve, for its share of the KV cache
(its KV heads); that many blocks per SP rank. With a fitted CPU cost model the budget is the
engine's `--kv-cache-memory-bytes`, as on the real workers. Replicas are independent copies
(data parallelism), each an SP x TP group with its own Scheduler and KV pools. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from csps.config import EngineConfig
from csps.costmodel.hardware import GIB, ClusterSpec
from csps.costmodel.shape import ModelShape
from csps.kvcache.capacity import plan_num_blocks
from csps.scheduler import Scheduler
from csps.scheduler.deployment import build_scheduler


@dataclass(frozen=True)
class MemoryPlan:
    kv_budget_bytes: int  # per rank
    kv_bytes_per_token: int  # per rank (its KV heads, all layers)
    num_blocks: int  # per SP rank
    max_model_len: int


def kv_bytes_per_token_per_rank(shape: ModelShape, tp: int) -> int:
    """KV bytes of one token on one TP member: its even share of the KV heads (at least 1)."""
    heads = max(1, -(-shape.num_kv_heads // tp))
    return shape.kv_bytes_per_token * heads // shape.num_kv_heads


def gpu_kv_budget(cluster: ClusterSpec, shape: ModelShape, tp: int,
                  gpu_memory_utilization: float = 0.9,
                  activation_reserve_bytes: int = GIB) -> int:
    """Bytes of one GPU left for the KV cache; ValueError when the weights do not fit."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                         f"{gpu_memory_utilization}")
    usable = int(cluster.gpu.memory_bytes * gpu_memory_utilization)
    budget = usable - shape.weight_bytes // tp - activation_reserve_bytes
    if budget <= 0:
        raise ValueError(f"{shape.name} ({shape.weight_bytes / GIB:.1f} GiB of weights) does "
                         f"not fit on {tp} x {cluster.gpu.name} with room for a KV cache; "
                         f"raise --tensor-parallel-size")
    return budget


def plan_memory(config: EngineConfig, shape: ModelShape, kv_budget_bytes: int,
                model_max_len: int) -> MemoryPlan:
    """Blocks per SP rank; max_model_len is the config's, or the model's context clipped to what
    the SP group's KV holds (ValueError if an explicit one does not fit)."""
    block_size = config.cache.block_size
    sp, tp = config.parallel.sequence_parallel_size, config.parallel.tensor_parallel_size
    per_token = kv_bytes_per_token_per_rank(shape, tp)
    max_len = config.model.max_model_len
    if max_len is None:
        blocks = kv_budget_bytes // (block_size * per_token)
        slack = 1 if sp > 1 else 0
        max_len = min(model_max_len, max(0, blocks - slack) * sp * block_size)
        if max_len < 1:
            raise ValueError(f"no room for a single KV block per rank ({kv_budget_bytes} bytes)")
    num_blocks = plan_num_blocks(kv_budget_bytes, block_size, per_token, max_len, sp)
    return MemoryPlan(kv_budget_bytes, per_token, num_blocks, max_len)


def build_schedulers(config: EngineConfig, plan: MemoryPlan, num_replicas: int = 1,
                     **scheduler_kwargs) -> list[Scheduler]:
    """One Scheduler per replica on fresh KV pools, assembled as the engine assembles its one
    (scheduler/deployment.py; keywords: predictor, allowed_sp_degrees)."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    return [build_scheduler(config, plan.num_blocks, plan.max_model_len, **scheduler_kwargs)
            for _ in range(num_replicas)]
