"""With shared prompt prefixes, the simulator and the engine still make the same scheduling
decisions and hit the same prefix-cache tokens (issue 14; test_sim_engine_decisions.py's
harness).

The simulator builds each prompt from its Mooncake-style hash ids (simulator/prompt_tokens.py:
ids far outside the tiny model's vocabulary); the engine gets the same prompts mapped into its
vocabulary by 3 + id mod 250, which keeps which KV blocks are shared (checked first). The
cached prefixes then decide where each request starts computing, and every step must match.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_sim_engine_decisions import (  # noqa: F401 (fixtures)
    MAX_TOKENS,
    POOL_BLOCKS,
    ClockedExecutor,
    cost_model_path,
    engine_config,
    model_dir,
    record_decisions,
)

from csps.request import SamplingParams
from csps.simulator.loop import RequestRecord
from csps.simulator.prompt_tokens import prompt_token_ids
from csps.simulator.run import SimulationConfig, build_simulator

BLOCK, HASH_BLOCK = 16, 32  # KV block; tokens per hash id (two KV blocks)
# (prompt tokens, hash ids): r1 shares 2 hash blocks with r0, r3 is r0 again, r5 shares 3
# with r4 (two SP-long prompts on sp = 2), r2 has no ids
WORKLOAD = [(100, (0, 1, 2, 3)), (120, (0, 1, 4, 5)), (40, ()), (100, (0, 1, 2, 3)),
            (300, (6, 7, 8) + tuple(range(20, 27))), (200, (6, 7, 8, 9, 10, 11, 12))]


def vocab_ids(ids: list[int]) -> list[int]:
    return [3 + t % 250 for t in ids]


def shared_blocks(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // BLOCK


def run_engine(config, timer, prompts: list[list[int]]):
    from csps.engine.executor import make_executor
    from csps.engine.llm_engine import LLMEngine

    engine = LLMEngine(config, executor_factory=lambda cfg, kwargs: ClockedExecutor(
        make_executor(cfg, kwargs), timer))
    try:
        seen = record_decisions(engine.scheduler)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"req-{i}", None, prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        stats = engine.scheduler.prefix_cache_stats
        return seen, (stats.queries, stats.hits)
    finally:
        engine.shutdown()


def run_simulator(config, model_dir, cost_model_path):  # noqa: F811
    config = dataclasses.replace(config, scheduler=dataclasses.replace(
        config.scheduler, cost_model=str(cost_model_path)))
    simulator, info = build_simulator(SimulationConfig(
        config, model=str(model_dir), sp_degrees="engine", use_predictor=False,
        hash_block_tokens=HASH_BLOCK))
    assert info["memory"]["num_blocks"] == POOL_BLOCKS
    (scheduler,) = simulator.schedulers
    seen = record_decisions(scheduler)
    records = simulator.run([RequestRecord(f"req-{i}", n, MAX_TOKENS, 0.0, hash_ids=ids)
                             for i, (n, ids) in enumerate(WORKLOAD)])
    assert all(len(r.token_times) == MAX_TOKENS and not r.error for r in records)
    stats = scheduler.prefix_cache_stats
    return seen, (stats.queries, stats.hits), simulator.timer


def test_the_engine_prompts_share_the_blocks_the_simulated_ones_share():
    simulated = [prompt_token_ids(i, n, ids, HASH_BLOCK) for i, (n, ids) in enumerate(WORKLOAD)]
    served = [vocab_ids(p) for p in simulated]
    for i in range(len(WORKLOAD)):
        for j in range(i):
            assert shared_blocks(simulated[i], simulated[j]) == \
                shared_blocks(served[i], served[j]), (i, j)
    assert shared_blocks(simulated[1], simulated[0]) == 4
    assert shared_blocks(simulated[5], simulated[4]) == 6


@pytest.mark.parametrize("policy,sp,scheduler", [
    ("sarathi", 1, {}),
    pytest.param("sps2", 2, {"lockstep": False, "sp_prefill_chunk": 64},
                 marks=pytest.mark.slow)])
def test_simulator_and_engine_hit_and_schedule_identically(model_dir, cost_model_path,  # noqa: F811
                                                           policy, sp, scheduler):
    config = engine_config(model_dir, policy, sp, "none", **scheduler)
    simulated, sim_stats, timer = run_simulator(config, model_dir, cost_model_path)
    prompts = [vocab_ids(prompt_token_ids(i, n, ids, HASH_BLOCK))
               for i, (n, ids) in enumerate(WORKLOAD)]
    served, engine_stats = run_engine(config, timer, prompts)
    assert engine_stats == sim_stats and sim_stats[1] > 0
    assert len(served) == len(simulated)
    for index, (a, b) in enumerate(zip(served, simulated, strict=True)):
        assert a == b, f"step {index + 1} differs"
