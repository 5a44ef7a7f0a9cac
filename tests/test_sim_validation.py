"""Simulator validation: replaying a bench result (csps/simulator/replay.py) and the per-request
errors benchmarks/sim_validation.py reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from csps.bench.workload import RequestSpec
from csps.config import EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from csps.scheduler.predictor import BUNDLED_PROFILE
from csps.simulator.replay import (
    compare_results,
    relative_errors,
    replay_specs,
    second_run_in_order,
)
from csps.simulator.run import SimulationConfig, simulate

ROOT = Path(__file__).resolve().parent.parent


def _bench_result(starts, inputs, outputs, ttfts, itls, latencies, errors=None) -> dict:
    return {"start_times": starts, "input_lens": inputs, "output_lens": outputs,
            "ttfts": ttfts, "itls": itls, "latencies": latencies,
            "errors": errors or [""] * len(starts)}


def test_replay_specs_keeps_successes_in_send_order_from_time_zero():
    real = _bench_result([5.0, 3.0, 4.0], [100, 200, 300], [4, 0, 2], [0.1, 0.0, 0.2],
                         [[0.1] * 3, [], [0.3]], [0.4, 0.0, 0.5], ["", "timeout", ""])
    indices, specs = replay_specs(real)
    assert indices == [2, 0]
    assert specs == [RequestSpec(0.0, 300, 2), RequestSpec(1.0, 100, 4)]
    with pytest.raises(ValueError, match="no successful request"):
        replay_specs(_bench_result([0.0], [10], [0], [0.0], [[]], [0.0], ["boom"]))


def test_compare_results_pairs_requests_and_takes_median_absolute_error():
    real = _bench_result([0.0, 1.0, 2.0, 3.0], [10] * 4, [3, 3, 1, 3], [1.0, 2.0, 4.0, 9.0],
                         [[0.1, 0.1], [0.2, 0.2], [], [0.5, 0.5]], [2.0, 4.0, 4.0, 10.0],
                         ["", "", "", "lost"])
    indices, _ = replay_specs(real)
    sim = _bench_result([0.0, 1.0, 2.0], [10] * 3, [3, 3, 1], [1.1, 2.0, 3.0],
                        [[0.1, 0.3], [0.2, 0.2], []], [2.0, 5.0, 2.0])
    c = compare_results(real, sim, indices)
    assert c["ttft"]["relative_errors"] == pytest.approx([0.1, 0.0, -0.25])
    assert c["ttft"]["median_abs_error"] == pytest.approx(0.1)
    assert c["tbt"]["num_requests"] == 2  # a single-token request has no TBT
    assert c["tbt"]["relative_errors"] == pytest.approx([1.0, 0.0])
    assert c["e2el"]["median_abs_error"] == pytest.approx(0.25)
    assert c["e2el"]["mean_error"] == pytest.approx((0.0 + 0.25 - 0.5) / 3)
    assert relative_errors([0.0, None, 2.0], [1.0, 1.0, None]) == []
    with pytest.raises(ValueError, match="failed in the simulator"):
        compare_results(real, {**sim, "errors": ["", "x", ""]}, indices)


def _load_script():
    spec = importlib.util.spec_from_file_location("sim_validation",
                                                  ROOT / "benchmarks" / "sim_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replaying_a_simulated_run_reproduces_it_exactly(tmp_path):
    """A 'real' result made by the simulator itself, shifted in time and written as JSON: the
    script's replay with the same flags must reproduce every request (errors 0); with the
    real TTFTs doubled, the TTFT errors are -50%."""
    engine = EngineConfig(model=ModelConfig(model="smollm2-135m", max_model_len=4096),
                          scheduler=SchedulerConfig(policy="sps2", long_prompt_threshold=512,
                                                    cost_model=str(BUNDLED_PROFILE)),
                          parallel=ParallelConfig(sequence_parallel_size=2))
    specs = [RequestSpec(0.0, 700, 4), RequestSpec(0.05, 90, 6), RequestSpec(0.3, 1200, 3),
             RequestSpec(0.31, 200, 1)]
    real = simulate(SimulationConfig(engine, model="smollm2-135m", use_predictor=False), specs)
    real["start_times"] = [t + 7.0 for t in real["start_times"]]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real))
    flags = [str(path), "-sp", "2", "--scheduler", "sps2", "--long-prompt-threshold", "512",
             "--max-model-len", "4096", "--out-dir", str(tmp_path / "out")]
    script = _load_script()
    report = script.main(flags)
    for name in ("ttft", "e2el"):
        assert report["metrics"][name]["num_requests"] == 4
        assert report["metrics"][name]["median_abs_error"] == pytest.approx(0.0, abs=1e-9)
    assert report["metrics"]["tbt"]["num_requests"] == 3
    assert report["use_predictor"] is False
    assert (tmp_path / "out" / "real-validation.png").stat().st_size > 0
    assert "| TTFT | 4 | 0.0% |" in (tmp_path / "out" / "real-validation.md").read_text()
    real["ttfts"] = [2 * t for t in real["ttfts"]]
    path.write_text(json.dumps(real))
    report = script.main([*flags, "--no-plot"])
    assert report["metrics"]["ttft"]["relative_errors"] == pytest.approx([-0.5] * 4)


def test_a_second_real_run_pairs_with_the_first_request_by_request():
    first = _bench_result([0.0, 0.0, 1.0], [10, 30, 20], [3, 3, 3], [1.0, 3.0, 2.0],
                          [[0.1, 0.1], [0.3, 0.3], [0.2, 0.2]], [2.0, 6.0, 4.0])
    # the same requests (workload order), the two sent together started the other way round,
    # each 10% slower
    second = _bench_result([0.1, 0.0, 1.0], [10, 30, 20], [3, 3, 3], [1.1, 3.3, 2.2],
                           [[0.11, 0.11], [0.33, 0.33], [0.22, 0.22]], [2.2, 6.6, 4.4])
    indices, paired = second_run_in_order(first, second)
    c = compare_results(first, paired, indices)
    for name in ("ttft", "tbt", "e2el"):
        assert c[name]["relative_errors"] == pytest.approx([0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="request 1 differs"):
        second_run_in_order(first, {**second, "input_lens": [10, 31, 20]})
    with pytest.raises(ValueError, match="request 2 differs"):
        second_run_in_order(first, {**second, "errors": ["", "", "timeout"]})
