"""One deployment's scheduler, assembled the same way for the engine and the simulator.

Both build it here from the EngineConfig: the KV pools (one per SP rank when the policy places
KV per rank, sps2 and loongserve; one pool otherwise), the deployment's SP attention as the
default every SP prefill gets (ParallelConfig.sp_attention_choice), the SP degrees the sps2
configurator may choose (--sp-prefill-degrees), and the instances a lock-step step spans. The
number of blocks and the predictor come from the caller (the engine plans memory for its dtype
and loads the cost model for its model; the simulator for the hardware it models). No torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csps.kvcache.kv_cache_manager import KVCacheManager
from csps.kvcache.placement import DistributedKVCacheManager
from csps.scheduler.scheduler import Scheduler

if TYPE_CHECKING:
    from collections.abc import Sequence

    from csps.config import EngineConfig
    from csps.scheduler.predictor import StepPredictor

PLACED_POLICIES = ("sps2", "loongserve")  # KV placed per SP rank (kvcache/placement.py)


def places_kv_per_rank(policy: str) -> bool:
    return policy in PLACED_POLICIES


def build_scheduler(config: EngineConfig, num_blocks: int, max_model_len: int,
                    predictor: StepPredictor | None = None,
                    allowed_sp_degrees: Sequence[int] | None = None) -> Scheduler:
    """The Scheduler of one SP x TP deployment on fresh KV pools of num_blocks blocks each
    (per SP rank when the policy places KV per rank). allowed_sp_degrees: None for the
    config's --sp-prefill-degrees (empty: the policy's default)."""
    parallel, block_size = config.parallel, config.cache.block_size
    sp_size = parallel.sequence_parallel_size
    caching = config.cache.enable_prefix_caching
    if places_kv_per_rank(config.scheduler.policy):
        manager = DistributedKVCacheManager(sp_size, num_blocks, block_size, caching)
    else:
        manager = KVCacheManager(num_blocks, block_size, caching)
    degrees = allowed_sp_degrees or config.scheduler.allowed_sp_degrees or None
    return Scheduler(config.scheduler, manager, max_model_len, predictor, degrees,
                     num_instances=sp_size, sp_attention=parallel.sp_attention_choice)
