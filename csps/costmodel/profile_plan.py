"""What `csps profile` runs (costmodel/profile.py): its configuration, the workloads of each
engine (one per SP algorithm, and with whole_prompts the whole-prompt engine) and the geometry
(longest prompt, SP threshold, token budget). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_SIZE = 16
ALGORITHMS = ("ulysses", "allgather_kv", "ring", "csa")
WHOLE = "whole"  # the whole-prompt engine's name in StepRecord.sp_attention


@dataclass(frozen=True)
class ProfileConfig:
    model: str  # a name (smollm2-135m), a Hugging Face folder or a .gguf file
    sp_size: int = 2
    quick: bool = False  # one SP algorithm, short prompts, no repeats: under a minute
    max_tokens: int | None = None  # the longest prompt profiled (None: 3072, 512 quick)
    seed: int = 0
    kv_cache_memory_bytes: int = 512 << 20  # per worker
    sp_attention: tuple[str, ...] = ()  # the SP algorithms profiled (empty: all four)
    whole_prompts: bool = False  # also batches of whole prompts (loongserve's local steps)

    def __post_init__(self) -> None:
        if self.sp_size < 1:
            raise ValueError(f"sp_size must be positive, got {self.sp_size}")
        if self.max_tokens is not None and self.max_tokens < 64:
            raise ValueError(f"max_tokens must be at least 64, got {self.max_tokens}")
        unknown = set(self.sp_attention) - set(ALGORITHMS)
        if unknown:
            raise ValueError(f"unknown SP attention {sorted(unknown)}; known: {ALGORITHMS}")

    @property
    def longest_prompt(self) -> int:
        return self.max_tokens or (512 if self.quick else 3072)

    @property
    def decode_steps(self) -> int:
        return 4 if self.quick else 8

    @property
    def algorithms(self) -> tuple[str, ...]:
        if self.sp_size == 1 or (self.quick and not self.sp_attention):
            return ("ulysses",)  # one engine (with sp_size 1: no SP prefill at all)
        return self.sp_attention or ALGORITHMS


@dataclass(frozen=True)
class Workload:
    kind: str  # warmup | prefill_local | prefill_sp | decode_local | decode_spread | prefill_whole
    prompt_lens: tuple[int, ...]  # requests added together
    max_tokens: int  # output tokens per request (1: the prefill's token only)
    repeats: int = 1  # runs; each step keeps its fastest time


def plan_workloads(config: ProfileConfig, max_len: int, threshold: int,
                   first: bool) -> list[Workload]:
    """One engine's workloads. Only the first engine runs the local and decode ones; every
    engine runs the SP prefills (the part that differs between SP algorithms)."""
    quick, steps, sp = config.quick, config.decode_steps, config.sp_size > 1
    reps = 1 if quick else 2
    plan = [Workload("warmup", (threshold // 2, threshold // 2)
                     + ((threshold,) if sp else ()), 2)]
    if first:
        for f in ((1, 3, 6, 8) if quick else (1, 2, 3, 4, 5, 6, 7, 8)):
            # below the SP threshold (local), chunked above the budget (threshold / 4)
            n = threshold * f // 8 - 1 if sp else max_len * f // 8
            plan.append(Workload("prefill_local", (max(8, n),), 1, reps))
        contexts = (threshold // 4,) if quick else (threshold // 8, threshold // 2)
        for batch in ((1, 4) if quick else (1, 4, 16)):
            plan += [Workload("decode_local", (c,) * batch, steps, reps) for c in contexts]
    if sp:
        for s in ((1, 2) if quick else (1, 2, 3, 4) if first else (1, 2, 4)):
            plan.append(Workload("prefill_sp", (min(max_len, threshold * s),), 1))
        if first:
            for batch in ((2,) if quick else (1, 4)):
                plan.append(Workload("decode_spread", (threshold,) * batch, steps, reps))
    return plan


def plan_whole_workloads(config: ProfileConfig, max_len: int) -> list[Workload]:
    """The whole-prompt engine's workloads: one, two and three prompts added together (each
    whole, on a rank of its own while ranks last), lengths up to max_len, and decodes of a
    few long contexts beside them."""
    reps, plan = (1 if config.quick else 2), [Workload("warmup", (max_len // 4,), 2)]
    for f in ((2, 8) if config.quick else (1, 2, 4, 6, 8)):
        n = max(16, max_len * f // 8)
        plan += [Workload("prefill_whole", lens, 1, reps)
                 for lens in ((n,), (n, max(16, n // 2)), (n, max(16, n // 2), max(16, n // 4)))]
    # NOTE: not 8 long contexts: their prefill alone took a quarter of a 2-worker profile
    for batch in (1, 4):
        plan.append(Workload("decode_local", (max_len,) * batch, config.decode_steps, reps))
    return plan


def profile_geometry(config: ProfileConfig, max_position: int) -> tuple[int, int]:
    """(longest prompt, SP prefill threshold) for a model of max_position positions."""
    max_len = min(config.longest_prompt, max_position - config.decode_steps - 1)
    return max_len, max(16, max_len // 4)


def token_budget(threshold: int) -> int:
    """The engines' max_num_batched_tokens: local prompts near the threshold run in 4 chunks."""
    return max(16, threshold // 4)


def engine_names(config: ProfileConfig) -> tuple[str, ...]:
    """One engine per SP algorithm, then the whole-prompt engine if asked for."""
    return config.algorithms + ((WHOLE,) if config.whole_prompts else ())


def num_workloads(config: ProfileConfig, max_len: int, threshold: int) -> int:
    return sum(len(plan_workloads(config, max_len, threshold, i == 0))
               for i in range(len(config.algorithms))) + (
        len(plan_whole_workloads(config, max_len)) if config.whole_prompts else 0)
