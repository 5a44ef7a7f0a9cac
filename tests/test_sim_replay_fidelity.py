"""What a replay of a real run needs to decide as the real engine did (pure Python): the
requests' prefix hash ids and the server's admission spacing go into the specs, and the
simulator can schedule on arrivals as the engine's loop does today (only with no step in
flight)."""

from __future__ import annotations

import dataclasses

from test_simulator import engine, small_simulator

from csps.costmodel.fitted import FittedCostModel
from csps.costmodel.models import model_shape
from csps.simulator.loop import RequestRecord
from csps.simulator.replay import replay_specs
from csps.simulator.run import SimulationConfig, build_simulator
from csps.simulator.timer import ConstantTimer


def test_replay_specs_carry_hash_ids_and_spread_simultaneous_sends():
    result = {"input_lens": [10, 20, 30, 40], "output_lens": [2, 2, 0, 2],
              "start_times": [5.0, 5.0, 5.0, 6.0], "errors": ["", "", "boom", ""],
              "hash_ids": [[0, 1], [0, 2], [0], [0, 1, 3]]}
    kept, specs = replay_specs(result, admission_s=0.01)
    assert kept == [0, 1, 3]  # the failed request is left out
    assert [s.arrival_s for s in specs] == [0.0, 0.01, 1.0]
    assert [s.hash_ids for s in specs] == [(0, 1), (0, 2), (0, 1, 3)]
    _, plain = replay_specs({k: v for k, v in result.items() if k != "hash_ids"})
    assert [s.arrival_s for s in plain] == [0.0, 0.0, 1.0] and plain[0].hash_ids == ()


def _first_token_s(arrival_starts_steps: bool) -> float:
    """Two SP instances, 1 s per step. a (64 tokens, 4 outputs) takes instance 0 at t=0; b
    arrives at t=0.5 while a's step is in flight and instance 1 is free."""
    simulator = small_simulator(engine(budget=128, sp=2, policy="sps2", lockstep=False),
                                ConstantTimer(1.0))
    simulator.arrival_starts_steps = arrival_starts_steps
    records = simulator.run([RequestRecord("a", 64, 4, 0.0), RequestRecord("b", 32, 2, 0.5)])
    return records[1].token_times[0]


def test_arrivals_start_steps_at_once_or_after_the_step_in_flight():
    assert _first_token_s(True) == 1.5  # b prefills on the free instance at once
    assert _first_token_s(False) == 2.0  # the engine's loop: b waits for a's step to end


def test_a_timing_cost_model_prices_the_steps_and_the_engines_model_plans(tmp_path):
    shape = model_shape("llama-2-7b")
    paths = {}
    for name, per_iteration_s in (("planning", 0.5), ("timing", 2.0)):
        paths[name] = tmp_path / f"{name}.json"
        FittedCostModel(per_iteration_s=per_iteration_s, name=name, shape=shape).to_json(
            paths[name])
    config = engine(policy="sarathi")
    config = dataclasses.replace(config, scheduler=dataclasses.replace(
        config.scheduler, cost_model=str(paths["planning"])))
    simulator, info = build_simulator(SimulationConfig(
        config, model="llama-2-7b", timing_cost_model=str(paths["timing"])))
    assert info["cost_model"]["planning"]["name"] == "planning"
    assert simulator.timer.cost_model.name == "timing"
    (record,) = simulator.run([RequestRecord("a", 16, 2, 0.0)])
    assert record.token_times == [2.0, 4.0]  # one prefill step, one decode step, 2 s each
