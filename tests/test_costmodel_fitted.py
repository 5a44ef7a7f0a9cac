"""NNLS, the fitted cost model's pricing rules and fit, its JSON and load_cost_model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from csps.costmodel.base import RankWork
from csps.costmodel.fitted import COEFFICIENTS, FittedCostModel
from csps.costmodel.load import load_cost_model, register_kind
from csps.costmodel.nnls import nnls
from csps.costmodel.shape import ModelShape

TRUE = FittedCostModel(per_iteration_s=2e-3, per_token_s=1e-4, per_seq_s=5e-4,
                       per_sampled_s=3e-3, per_attn_pair_s=2e-9, per_decode_kv_token_s=1e-6,
                       per_byte_s=1e-9, per_collective_s=1e-4)


def test_nnls_hand_made_problems():
    # unconstrained optimum (2, -1); with x >= 0: x2 = 0, x1 = mean(2, 1) = 1.5
    x = nnls(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([2.0, -1.0, 1.0]))
    np.testing.assert_allclose(x, [1.5, 0.0], atol=1e-12)
    # a consistent system with a non-negative solution is solved exactly, whatever the scales
    a = np.array([[1.0, 1e6, 0.0], [2.0, 0.0, 1e-6], [0.0, 3e6, 1e-6], [1.0, 1e6, 2e-6]])
    want = np.array([0.5, 2e-6, 3e5])
    np.testing.assert_allclose(nnls(a, a @ want), want, rtol=1e-9)
    with pytest.raises(ValueError):
        nnls(np.ones((3, 2)), np.ones(2))


def test_rank_time_hides_overlappable_bytes_up_to_compute():
    model = FittedCostModel(per_token_s=1.0, per_byte_s=0.5, per_iteration_s=10.0)
    work = RankWork(num_tokens=3, comm_bytes={"prefill_attn": 4}, overlappable_bytes=4)
    assert model.rank_time(work) == 3.0  # 2 s of transfer fully behind 3 s of compute
    short = RankWork(num_tokens=1, comm_bytes={"prefill_attn": 4}, overlappable_bytes=4)
    assert model.rank_time(short) == 2.0  # 1 s hidden, 1 s exposed
    assert model.iteration_time([work, short]) == 13.0  # slowest rank + per iteration
    with pytest.raises(ValueError):
        FittedCostModel(per_token_s=-1e-9)


def _random_steps(rng: np.random.Generator, count: int) -> list[list[RankWork]]:
    def rank() -> RankWork:
        n = int(rng.integers(0, 2000))
        return RankWork(num_tokens=n, num_seqs=int(rng.integers(1, 9)),
                        num_sampled=int(rng.integers(0, 9)),
                        attn_pairs=float(rng.integers(0, 10**7)),
                        decode_kv_tokens=int(rng.integers(0, 10**5)),
                        comm_bytes={"prefill_attn": int(rng.integers(0, 10**7))},
                        num_collectives=int(rng.integers(0, 200)))
    return [[rank(), rank()] for _ in range(count)]


def test_fit_recovers_known_coefficients_through_the_max_over_ranks():
    steps = _random_steps(np.random.default_rng(0), 200)
    times = [TRUE.iteration_time(w) for w in steps]
    fitted = FittedCostModel.fit_steps(steps, times, trim=0.0)
    for name in COEFFICIENTS:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert max(fitted.relative_errors(steps, times)) < 1e-9


def test_fit_leaves_out_stalled_steps():
    steps = _random_steps(np.random.default_rng(1), 200)
    times = [TRUE.iteration_time(w) * (5.0 if i % 10 == 0 else 1.0)  # 10% stalls
             for i, w in enumerate(steps)]
    fitted = FittedCostModel.fit_steps(steps, times, trim=0.2)
    assert fitted.per_token_s == pytest.approx(TRUE.per_token_s, rel=1e-3)
    assert np.median(fitted.relative_errors(steps, times)) < 1e-3


def test_json_round_trip_and_load(tmp_path):
    shape = ModelShape("toy", 2, 64, 128, 4, 2, 16, 100, dtype_bytes=4)
    model = FittedCostModel(**TRUE.coefficients, shape=shape, parallel={"sp": 2},
                            fit={"held_out": {"median_rel_err": 0.1}}, date="2025-01-01")
    path = tmp_path / "m.json"
    model.to_json(path)
    assert json.loads(path.read_text())["kind"] == "fitted"
    assert load_cost_model(path) == model
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(ValueError, match="unknown cost model kind"):
        load_cost_model(bad)
    register_kind("nope", lambda data: FittedCostModel(per_iteration_s=1.0))
    assert load_cost_model(bad).iteration_time([]) == 1.0


def test_shipped_profile_loads_by_name():
    model = load_cost_model("cpu-smollm2-135m-sp2")
    assert isinstance(model, FittedCostModel) and model.shape.name == "smollm2-135m"
    assert np.isfinite(model.fit["held_out"]["median_rel_err"])


def test_cost_model_modules_import_without_torch():
    modules = ["csps.costmodel.fitted", "csps.costmodel.load", "csps.costmodel.profile",
               "csps.costmodel.profile_cli", "csps.cli"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
