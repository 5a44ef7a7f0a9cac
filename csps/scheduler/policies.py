"""The policy registry: the SchedulingPolicy a SchedulerConfig names, built with what it plans
with. Policies depend only on the books' interface (books.py), never on Scheduler, so this
module imports them all at the top and scheduler.py imports it: no import circle. No torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csps.scheduler.configurator import Sps2Configurator
from csps.scheduler.loongserve import LoongServePolicy
from csps.scheduler.loongserve_steps import LoongServeStepsPolicy
from csps.scheduler.policy import SarathiPolicy, SchedulingPolicy, VllmPolicy
from csps.scheduler.sps2 import Sps2Policy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from csps.config import SchedulerConfig
    from csps.scheduler.predictor import StepPredictor

POLICIES = ("sarathi", "vllm", "sps2", "loongserve")


def make_policy(config: SchedulerConfig, predictor: StepPredictor | None = None,
                allowed_degrees: Sequence[int] | None = None) -> SchedulingPolicy:
    """The policy config.policy names. predictor: lets sps2 configure each long prompt and
    loongserve fit its cost per degree (loongserve needs one); allowed_degrees: SP prefill
    group sizes a policy may choose (default: sps2 any of 1..P, loongserve its own)."""
    if config.policy == "sarathi":
        return SarathiPolicy()
    if config.policy == "vllm":
        return VllmPolicy()
    if config.policy == "sps2":
        if config.slo_tbt is not None and predictor is None:
            raise ValueError("--slo-tbt needs a cost model to price steps (--cost-model)")
        configurator = None if predictor is None else Sps2Configurator(
            predictor, allowed_degrees, config.sps2_csa_candidates,
            config.sps2_micro_batch_candidates, slo_tbt=config.slo_tbt,
            chunk=config.sp_prefill_chunk, decode_free_slack=config.consolidate_decode_kv)
        return Sps2Policy(config.long_prompt_threshold, config.hybrid_batching, configurator,
                          concurrent=not config.lockstep, sp_prefill_chunk=config.sp_prefill_chunk,
                          consolidate=bool(config.consolidate_decode_kv))
    if config.policy == "loongserve":
        policy = LoongServePolicy if config.lockstep else LoongServeStepsPolicy
        return policy(predictor, allowed_degrees, config.loongserve_sp_batch)
    raise ValueError(f"unknown scheduler policy {config.policy!r}; choose from {POLICIES}")
