"""`csps profile --quick` end to end on the real model over 2 SP workers: the JSON loads,
its coefficients are non-negative, its held-out error is reported, and it prices a longer
SP prefill above a shorter one. (Under a minute on the 2-core dev machines.)"""

from __future__ import annotations

import json
import math

import pytest

from csps.cli import build_parser
from csps.config import ParallelConfig
from csps.costmodel.fitted import COEFFICIENTS, FittedCostModel
from csps.costmodel.load import load_cost_model
from csps.costmodel.profile import ProfileConfig, plan_workloads
from csps.costmodel.profile_cli import profile, profile_command
from csps.costmodel.work import sp_prefill_work

pytestmark = pytest.mark.slow


def test_profile_subcommand_is_registered():
    args = build_parser().parse_args(["profile", "smollm2-135m", "--quick", "--sp-size", "2"])
    assert args.handler is profile_command and args.quick and args.sp_size == 2


def test_plan_covers_every_kind_and_quick_is_small():
    config = ProfileConfig("m", sp_size=2)
    kinds = {w.kind for w in plan_workloads(config, 3072, 768, first=True)}
    assert kinds == {"warmup", "prefill_local", "decode_local", "prefill_sp", "decode_spread"}
    later = {w.kind for w in plan_workloads(config, 3072, 768, first=False)}
    assert later == {"warmup", "prefill_sp"}  # other SP algorithms: their prefills only
    assert ProfileConfig("m", quick=True).algorithms == ("ulysses",)
    assert len(ProfileConfig("m").algorithms) == 4


def test_quick_profile_fits_and_saves(real_model_dir, tmp_path):
    path = tmp_path / "quick.json"
    profile(ProfileConfig(str(real_model_dir), sp_size=2, quick=True), path)
    data = json.loads(path.read_text())
    assert data["kind"] == "fitted" and data["steps"]
    model = load_cost_model(path)
    assert isinstance(model, FittedCostModel)
    assert all(getattr(model, c) >= 0 for c in COEFFICIENTS)
    held_out = model.fit["held_out"]
    assert held_out["num_steps"] >= 3
    assert math.isfinite(held_out["median_rel_err"]) and math.isfinite(held_out["p90_rel_err"])
    assert {"load_average_before", "cpu_count"} <= set(model.machine)
    parallel = ParallelConfig(sequence_parallel_size=2)
    small = sp_prefill_work([128, 128], model.shape, parallel)
    big = sp_prefill_work([1024, 1024], model.shape, parallel)
    assert model.iteration_time(big) > model.iteration_time(small)
