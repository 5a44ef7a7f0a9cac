"""Capacity search (simulator/capacity.py): the search's bookkeeping on step-function probes,
scheduling delays in the simulator's result, a capacity worked out by hand on a constant-time
replica, and `csps simulate --capacity`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from csps.bench.workload import WorkloadConfig, build_workload
from csps.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from csps.costmodel.models import model_shape
from csps.simulator.capacity import CapacitySearch, CapacitySLOs, find_capacity, probe_metrics
from csps.simulator.cluster import build_schedulers, plan_memory
from csps.simulator.loop import RequestRecord, Simulator
from csps.simulator.result import simulation_result
from csps.simulator.run import records_from_specs
from csps.simulator.timer import ConstantTimer

SLOS = CapacitySLOs(p99_tbt_s=0.1, median_sched_delay_s=2.0)


def step_probe(threshold: float, calls: list[float]):
    """Passes both SLOs at rates <= threshold, misses the delay SLO above."""
    def probe(rate: float) -> dict:
        calls.append(rate)
        delay_ms = 100.0 if rate <= threshold else 5000.0
        return {"completed": 10, "p99_itl_ms": 50.0, "median_sched_delay_ms": delay_ms}
    return probe


def check_bookkeeping(found: dict, threshold: float, tol: float) -> None:
    passes = [p["rate"] for p in found["probes"] if p["passed"]]
    fails = [p["rate"] for p in found["probes"] if not p["passed"]]
    assert max(passes) < min(fails)  # every probe on its side of the bracket
    assert found["bracket"] == [max(passes), min(fails)]
    assert found["capacity"] == max(passes)
    assert threshold / (1 + tol) <= found["capacity"] <= threshold
    assert min(fails) - max(passes) <= tol * max(passes)


@pytest.mark.parametrize("start", [0.1, 1.0, 50.0])
@pytest.mark.parametrize("tol", [0.05, 0.01])
def test_the_search_brackets_then_bisects_to_the_tolerance(start, tol):
    calls: list[float] = []
    seen: list[dict] = []
    found = find_capacity(step_probe(3.7, calls), SLOS, CapacitySearch(start, tol), seen.append)
    check_bookkeeping(found, 3.7, tol)
    assert calls == [p["rate"] for p in found["probes"]] == [p["rate"] for p in seen]
    assert calls[0] == start and len(calls) == found["num_probes"] <= 20


def test_no_passing_rate_gives_zero_and_no_failing_rate_an_open_bracket():
    calls: list[float] = []
    found = find_capacity(step_probe(1e-9, calls), SLOS, CapacitySearch(1.0, min_rate=0.01))
    assert found["capacity"] == 0.0 and found["bracket"][0] is None
    assert min(calls) >= 0.01 and len(calls) == 7  # 1, 1/2, ..., 1/64
    found = find_capacity(step_probe(1e9, []), SLOS, CapacitySearch(1.0, max_rate=100.0))
    assert found["bracket"] == [64.0, None] and found["capacity"] == 64.0


def test_the_tbt_slo_alone_fails_a_probe():
    assert SLOS.is_met({"completed": 1, "p99_itl_ms": 100.0, "median_sched_delay_ms": 2000.0})
    assert not SLOS.is_met({"completed": 1, "p99_itl_ms": 100.1, "median_sched_delay_ms": 0.0})
    assert not SLOS.is_met({"completed": 0, "p99_itl_ms": 0.0, "median_sched_delay_ms": 0.0})
    with pytest.raises(ValueError):
        CapacitySLOs(0.0)
    with pytest.raises(ValueError):
        CapacitySearch(start_rate=0.5, min_rate=1.0)


def one_at_a_time_simulator(seconds: float) -> Simulator:
    """One replica running one request at a time (max_num_seqs 1), `seconds` per iteration."""
    config = EngineConfig(model=ModelConfig(max_model_len=256), cache=CacheConfig(block_size=16),
                          scheduler=SchedulerConfig(policy="sarathi", max_num_batched_tokens=64,
                                                    max_num_seqs=1))
    shape = model_shape("llama-2-7b")
    plan = plan_memory(config, shape, 64 * 16 * shape.kv_bytes_per_token, 4096)
    return Simulator(build_schedulers(config, plan), ConstantTimer(seconds))


def test_scheduling_delay_runs_from_send_to_the_first_iteration():
    sim = one_at_a_time_simulator(0.1)
    records = sim.run([RequestRecord("a", 10, 3, 0.0), RequestRecord("b", 10, 2, 0.05),
                       RequestRecord("c", 10, 1, 0.5)])
    assert [r.first_scheduled_s for r in records] == pytest.approx([0.0, 0.3, 0.5])
    result = simulation_result(records, sim)
    assert result["scheduling_delays"] == pytest.approx([0.0, 0.25, 0.0])
    assert result["median_sched_delay_ms"] == pytest.approx(0.0)
    assert result["mean_sched_delay_ms"] == pytest.approx(250.0 / 3)


def test_capacity_of_a_one_at_a_time_replica_matches_the_hand_computation():
    """Each request holds the replica for k = 10 iterations of d = 10 ms: S = 0.1 s. Arrivals
    every g = 1/rate (burstiness 1e6: Poisson's gaps made near-deterministic so the answer is
    exact). With g < S request i starts at i*S, a delay of i*(S - g); the median of 101 requests
    is request 50's, so median delay <= D = 0.9 s iff g >= S - D/50: capacity 1/0.082 req/s.
    TBT is always 10 ms, under its SLO."""
    workload = WorkloadConfig(num_prompts=101, random_input_len=16, random_output_len=10,
                              burstiness=1e6, seed=3)

    def probe(rate: float) -> dict:
        specs = build_workload(dataclasses.replace(workload, request_rate=rate))
        sim = one_at_a_time_simulator(0.01)
        return probe_metrics(simulation_result(sim.run(records_from_specs(specs)), sim))

    tol = 0.05
    found = find_capacity(probe, CapacitySLOs(0.05, 0.9), CapacitySearch(1.0, tol))
    expected = 1 / (0.1 - 0.9 / 50)
    check_bookkeeping(found, expected * 1.001, tol)  # the 1e6 gamma shape leaves ~0.1% jitter
    assert all(p["metrics"]["p99_itl_ms"] == pytest.approx(10.0) for p in found["probes"])


def test_the_cli_searches_and_saves_every_probe(tmp_path, capsys):
    from csps.cli import main

    status = main(["simulate", "--scheduler", "sarathi", "--model", "llama-2-7b",
                   "--num-prompts", "30", "--random-input-len", "512", "--random-output-len",
                   "16", "--capacity", "--slo-p99-tbt", "0.2", "--slo-median-delay", "0.1",
                   "--request-rate", "2",
                   "--capacity-tol", "0.2", "--save-result", "--result-dir", str(tmp_path),
                   "--result-filename", "cap.json"])
    saved = json.loads((tmp_path / "cap.json").read_text())
    assert status == 0 and saved["capacity"] > 0 and saved["num_probes"] >= 2
    assert saved["probes"][0]["rate"] == 2.0
    assert {p["passed"] for p in saved["probes"]} == {True, False}
    assert saved["capacity"] == max(p["rate"] for p in saved["probes"] if p["passed"])
    out = capsys.readouterr().out
    assert out.count("req/s: p99 TBT") == saved["num_probes"] and "capacity:" in out
