"""The tiny Llama copied with a byte tokenizer and a fitted cost model beside it (cost.json), for
the engine tests whose sps2 configurator or loongserve policy plans with one."""

from __future__ import annotations

import shutil
from pathlib import Path

from csps.costmodel.fitted import FittedCostModel
from csps.costmodel.shape import ModelShape

COEFFICIENTS = dict(per_iteration_s=2e-3, per_token_s=2e-5, per_seq_s=1e-4, per_sampled_s=5e-5,
                    per_attn_pair_s=2e-8, per_decode_kv_token_s=1e-7, per_byte_s=2e-9,
                    per_collective_s=5e-5)


def copy_with_cost_model(tiny_model_dir: Path, folder: Path, name: str = "tiny-test",
                         **overrides: float) -> Path:
    """`folder` holding the model, its tokenizer and cost.json (COEFFICIENTS with overrides)."""
    from test_executor import save_byte_tokenizer

    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    save_byte_tokenizer(folder)
    shape = ModelShape.from_config_file(folder / "config.json", dtype_bytes=4)
    FittedCostModel(**{**COEFFICIENTS, **overrides}, name=name, shape=shape).to_json(
        folder / "cost.json")
    return folder


def recording_engine(model_dir: Path, sp: int, policy: str, block_size: int = 16, **scheduler):
    """(an LLMEngine of the tiny model, the list it appends (time.monotonic(), step) to for
    every step its scheduler emits). Budget 64 tokens, long prompts from 128 tokens."""
    import time

    from csps.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )
    from csps.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=512, dtype="float32"),
        cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=8 << 20),
        scheduler=SchedulerConfig(policy=policy, max_num_batched_tokens=64,
                                  long_prompt_threshold=128, **scheduler),
        parallel=ParallelConfig(sequence_parallel_size=sp)))
    steps: list = []
    schedule_steps = engine.scheduler.schedule_steps

    def recording():
        new = schedule_steps()
        steps.extend((time.monotonic(), step) for step in new)
        return new
    engine.scheduler.schedule_steps = recording
    return engine, steps
