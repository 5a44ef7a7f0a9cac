"""LoongServe-shaped length workloads (csps/bench/length_workloads.py): seeded determinism, lengths
within bounds and the context, sample means near the shapes' means, the 1:1:1 mix, Poisson
arrivals at the requested rate, and a trace `csps simulate` reads back."""

from __future__ import annotations

import numpy as np
import pytest

from csps.bench.length_workloads import (
    SHAPES,
    WORKLOADS,
    Levels,
    LogNormal,
    sample_lengths,
    trace_rows,
    write_trace,
)
from csps.bench.traces import read_trace

CONTEXT = 1 << 20


@pytest.mark.parametrize("workload", WORKLOADS)
def test_same_seed_same_trace_other_seed_other_trace(workload):
    assert trace_rows(workload, 50, 2.0, CONTEXT, seed=3) == trace_rows(workload, 50, 2.0,
                                                                          CONTEXT, seed=3)
    assert trace_rows(workload, 50, 2.0, CONTEXT, seed=3) != trace_rows(workload, 50, 2.0,
                                                                          CONTEXT, seed=4)


@pytest.mark.parametrize("name", list(SHAPES))
def test_lengths_within_the_shape_bounds(name):
    shape = SHAPES[name]
    pairs = np.asarray(sample_lengths(name, 2000, CONTEXT, seed=0))
    assert pairs[:, 0].min() >= shape.inputs.low and pairs[:, 0].max() <= shape.inputs.high
    assert pairs[:, 1].min() >= shape.outputs.low and pairs[:, 1].max() <= shape.outputs.high


@pytest.mark.parametrize("workload", WORKLOADS)
def test_prompt_plus_output_fits_a_small_context(workload):
    for prompt, output in sample_lengths(workload, 300, 8192, seed=1):
        assert prompt >= 1 and output >= 1 and prompt + output <= 8192


@pytest.mark.parametrize("name", list(SHAPES))
def test_sample_means_near_the_shape_means(name):
    shape = SHAPES[name]
    pairs = np.asarray(sample_lengths(name, 20_000, CONTEXT, seed=0))
    assert pairs[:, 0].mean() == pytest.approx(shape.inputs.mean(), rel=0.05)
    assert pairs[:, 1].mean() == pytest.approx(shape.outputs.mean(), rel=0.05)


def test_lognormal_mean_accounts_for_clipping():
    unclipped = LogNormal(100, 0.5, 1, 10**9)
    assert unclipped.mean() == pytest.approx(100 * np.exp(0.125), rel=1e-6)
    assert LogNormal(100, 2.0, 50, 60).mean() == pytest.approx(55, abs=5)
    draws = LogNormal(100, 1.0, 30, 300).sample(np.random.default_rng(0), 50_000)
    assert draws.mean() == pytest.approx(LogNormal(100, 1.0, 30, 300).mean(), rel=0.01)


def test_mixed_is_equal_thirds_of_the_three_shapes():
    pairs = np.asarray(sample_lengths("mixed", 3000, CONTEXT, seed=0))
    assert len(pairs) == 3000
    expected = np.mean([s.inputs.mean() for s in SHAPES.values()])
    assert pairs[:, 0].mean() == pytest.approx(expected, rel=0.05)
    # L-Eval prompts start at 3k tokens: below it, only ShareGPT's (88.5% of its third)
    assert int((pairs[:, 0] < 3000).sum()) == pytest.approx(0.885 * 1000, abs=60)
    assert len(sample_lengths("mixed", 7, CONTEXT)) == 7


def test_arrivals_are_poisson_at_the_requested_rate():
    rows = trace_rows("sharegpt", 5000, 4.0, CONTEXT, seed=0)
    times = np.asarray([r["timestamp"] for r in rows]) / 1000.0
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert len(rows) / times[-1] == pytest.approx(4.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential gaps


def test_written_trace_reads_back_as_mooncake(tmp_path):
    rows = trace_rows("leval", 20, 0.5, CONTEXT, seed=2)
    records = read_trace(write_trace(tmp_path / "t" / "leval.jsonl", rows), "mooncake")
    assert [(r.input_len, r.output_len) for r in records] == [
        (r["input_length"], r["output_length"]) for r in rows]
    assert records[-1].timestamp_s == pytest.approx(rows[-1]["timestamp"] / 1000.0)


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        LogNormal(0, 1.0, 1, 10)
    with pytest.raises(ValueError):
        Levels((), 0.1, 1, 10)
    with pytest.raises(ValueError):
        sample_lengths("alpaca", 10, CONTEXT)
    with pytest.raises(ValueError):
        trace_rows("leval", 10, 0.0, CONTEXT)
