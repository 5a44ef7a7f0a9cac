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
from csps.costmodel.profile import (
    WHOLE,
    ProfileConfig,
    engine_names,
    model_shape,
    num_workloads,
    plan_whole_workloads,
    plan_workloads,
    run_profile,
)
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


def test_the_whole_prompt_engine_plans_batches_of_whole_prompts():
    config = ProfileConfig("m", sp_size=2, sp_attention=("ring",), whole_prompts=True)
    assert config.algorithms == ("ring",) and engine_names(config) == ("ring", WHOLE)
    plan = plan_whole_workloads(config, 4096)
    batches = [w.prompt_lens for w in plan if w.kind == "prefill_whole"]
    assert max(map(len, batches)) == 3 and max(max(b) for b in batches) == 4096
    assert num_workloads(config, 4096, 1024) == len(plan) + len(
        plan_workloads(config, 4096, 1024, first=True))
    with pytest.raises(ValueError, match="unknown SP attention"):
        ProfileConfig("m", sp_attention=("zigzag",))


def test_a_whole_prompt_profile_runs_prompts_whole_side_by_side(real_model_dir, tmp_path):
    config = ProfileConfig(str(real_model_dir), sp_size=2, quick=True, max_tokens=256,
                           sp_attention=("ring",), whole_prompts=True)
    shape, max_position = model_shape(config.model)
    records = run_profile(config, shape, max_position)
    whole = [r for r in records if r.kind == "prefill_whole"]
    assert whole and all(r.sp_attention == WHOLE for r in whole)
    for record in whole:  # every prompt whole in one step, on a rank of its own
        prompts = [r for r in record.output.scheduled_requests if r.num_computed_tokens == 0]
        assert prompts and all(not r.is_sp_prefill for r in prompts)
        assert len({r.leader for r in prompts}) == min(2, len(prompts))
    assert max(len(r.output.scheduled_requests) for r in whole) >= 2
    assert {r.sp_attention for r in records} == {"ring", WHOLE}


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
