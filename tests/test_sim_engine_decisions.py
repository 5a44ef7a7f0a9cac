"""The simulator and the engine make the same scheduling decisions (issue 7's validation).

One scripted workload (six prompts of mixed lengths, two of them SP-long, all sent at t = 0,
ignore_eos, fixed max_tokens) runs through (a) the real LLMEngine on the tiny random model,
with spawned SP worker processes when sp = 2, and (b) `csps simulate`'s build path
(build_simulator: the same EngineConfig, memory plan from the same KV budget, the same fitted
cost model as predictor). Every SchedulerOutput each scheduler emits is recorded by wrapping
`scheduler.schedule`; the per-iteration decisions must be identical: per request, its id, tokens
scheduled, tokens computed, SP chunk lengths, KV ranks and leader.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from csps.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from csps.costmodel.fitted import FittedCostModel
from csps.costmodel.shape import ModelShape
from csps.request import SamplingParams
from csps.scheduler.output import SchedulerOutput
from csps.simulator.loop import RequestRecord
from csps.simulator.run import SimulationConfig, build_simulator

PROMPT_LENS = (300, 40, 17, 450, 90, 160)  # two over the SP threshold (128) on sp = 2
MAX_TOKENS = 12
BLOCK = 16
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, fp32
POOL_BLOCKS = 48  # per SP rank: 768 tokens, less than the 1,057 prompt tokens (KV queueing)


def decisions(output: SchedulerOutput) -> list[tuple]:
    return [(r.request_id, r.num_scheduled_tokens, r.num_computed_tokens, r.sp_chunk_lens,
             tuple(t.rank for t in r.kv_ranges), r.leader) for r in output.scheduled_requests]


def record_decisions(scheduler) -> list[list[tuple]]:
    """Wrap scheduler.schedule so that every output's decisions are appended to the list."""
    seen: list[list[tuple]] = []
    schedule = scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        output = schedule()
        seen.append(decisions(output))
        return output

    scheduler.schedule = recording_schedule
    return seen


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a byte-level tokenizer (the engine loads one)."""
    from test_executor import save_byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny_engine")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def cost_model_path(tiny_model_dir, tmp_path_factory):
    """A fitted model of the tiny Llama (made-up, plausible CPU coefficients)."""
    shape = ModelShape.from_config_file(tiny_model_dir / "config.json", dtype_bytes=4)
    path = tmp_path_factory.mktemp("cost") / "tiny-fitted.json"
    FittedCostModel(per_iteration_s=2e-3, per_token_s=2e-5, per_seq_s=1e-4, per_sampled_s=5e-5,
                    per_attn_pair_s=2e-8, per_decode_kv_token_s=1e-7, per_byte_s=2e-9,
                    per_collective_s=5e-5, name="tiny-test", shape=shape).to_json(path)
    return path


def engine_config(model_dir, policy: str, sp: int, cost_model: str) -> EngineConfig:
    budget = 512 if policy == "loongserve" else 64  # loongserve prefills prompts whole
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=512, dtype="float32"),
        cache=CacheConfig(block_size=BLOCK, kv_cache_memory_bytes=POOL_BLOCKS * BLOCK
                          * BYTES_PER_TOKEN),
        scheduler=SchedulerConfig(policy=policy, max_num_batched_tokens=budget,
                                  long_prompt_threshold=128, cost_model=cost_model),
        parallel=ParallelConfig(sequence_parallel_size=sp))


def run_engine(config: EngineConfig) -> list[list[tuple]]:
    from csps.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    try:
        seen = record_decisions(engine.scheduler)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for i, n in enumerate(PROMPT_LENS):
            engine.add_request(f"req-{i}", None, [3 + (7 * i + j) % 250 for j in range(n)],
                               params)
        done: dict[str, int] = {}
        while engine.has_unfinished_requests():
            for out in engine.step()[0]:
                done[out.request_id] = len(out.outputs[0].token_ids)
        assert done == {f"req-{i}": MAX_TOKENS for i in range(len(PROMPT_LENS))}
        return seen
    finally:
        engine.shutdown()


def run_simulator(config: EngineConfig, model_dir, cost_model_path) -> list[list[tuple]]:
    """The simulator always prices with the fitted model (the KV budget then comes from the
    engine's --kv-cache-memory-bytes); under cost_model 'none' the policies get no predictor."""
    predicted = config.scheduler.cost_model != "none"
    config = dataclasses.replace(config, scheduler=dataclasses.replace(
        config.scheduler, cost_model=str(cost_model_path)))
    simulator, info = build_simulator(SimulationConfig(config, model=str(model_dir),
                                                       sp_degrees="engine",
                                                       use_predictor=predicted))
    assert info["memory"]["num_blocks"] == POOL_BLOCKS
    (scheduler,) = simulator.schedulers
    seen = record_decisions(scheduler)
    records = simulator.run([RequestRecord(f"req-{i}", n, MAX_TOKENS, 0.0)
                             for i, n in enumerate(PROMPT_LENS)])
    assert all(len(r.token_times) == MAX_TOKENS and not r.error for r in records)
    return seen


SPAWNED = pytest.mark.slow  # sp = 2: two worker processes


@pytest.mark.parametrize("policy,sp,with_cost_model", [
    ("sarathi", 1, False), pytest.param("sps2", 2, False, marks=SPAWNED),
    pytest.param("sps2", 2, True, marks=SPAWNED),
    pytest.param("loongserve", 2, True, marks=SPAWNED)])
def test_simulator_and_engine_schedule_identically(model_dir, cost_model_path, policy, sp,
                                                   with_cost_model):
    config = engine_config(model_dir, policy, sp,
                           str(cost_model_path) if with_cost_model else "none")
    simulated = run_simulator(config, model_dir, cost_model_path)
    served = run_engine(config)
    assert len(served) == len(simulated)
    for iteration, (a, b) in enumerate(zip(served, simulated, strict=True)):
        assert a == b, f"iteration {iteration + 1} differs"
    flat = [d for step in served for d in step]
    assert sum(n for _, n, *_ in flat) == sum(PROMPT_LENS) + len(PROMPT_LENS) * (MAX_TOKENS - 1)
    sp_prefills = [(chunks, ranks) for *_, chunks, ranks, _ in flat if chunks is not None]
    if policy == "sps2":  # SP prefills, and decodes over KV spread across the ranks
        assert sp_prefills and any(len(set(ranks)) > 1 for *_, ranks, _ in flat)
    if policy == "loongserve":  # a ring prefill scaled down: its KV left on fewer ranks
        assert any(len(set(ranks)) < sum(1 for n in chunks if n) for chunks, ranks in sp_prefills)
