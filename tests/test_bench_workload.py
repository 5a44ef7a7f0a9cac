"""Workload generation for `csps bench serve`: trace parsers, scaling, arrival processes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from csps.bench.arrivals import arrival_times
from csps.bench.traces import TraceRecord, detect_format, read_trace, scale_records
from csps.bench.workload import WorkloadConfig, build_workload


@pytest.fixture
def mooncake(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 1000, "input_length": 600, "output_length": 20, "hash_ids": [0, 1]},
            {"timestamp": 3000, "input_length": 1100, "output_length": 3, "hash_ids": [0, 2, 3]},
            {"timestamp": 3500, "input_length": 40, "output_length": 1, "hash_ids": [4]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def azure(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,109\n"
                    "2023-11-16 18:16:46.1805900,879,1\n")
    return path


def test_mooncake_records_ms_to_relative_seconds(mooncake):
    assert detect_format(mooncake) == "mooncake"
    assert read_trace(mooncake) == [TraceRecord(0.0, 600, 20, (0, 1)),
                                    TraceRecord(2.0, 1100, 3, (0, 2, 3)),
                                    TraceRecord(2.5, 40, 1, (4,))]


def test_azure_datetimes_with_seven_fraction_digits(azure):
    assert detect_format(azure) == "azure"
    records = read_trace(azure)
    assert [r.timestamp_s for r in records] == pytest.approx([0.0, 4.314579, 59.5])
    assert [(r.input_len, r.output_len) for r in records] == [(374, 44), (396, 109), (879, 1)]


@pytest.mark.parametrize("with_times", [True, False])
def test_sarathi_csv_with_and_without_arrivals(tmp_path, with_times):
    path = tmp_path / "sarathi.csv"
    if with_times:
        path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                        "10.5,100,7\n11.0,2048,64\n")
    else:
        path.write_text("num_prefill_tokens,num_decode_tokens\n100,7\n2048,64\n")
    assert detect_format(path) == "sarathi"
    records = read_trace(path)
    assert [(r.input_len, r.output_len) for r in records] == [(100, 7), (2048, 64)]
    assert [r.timestamp_s for r in records] == ([0.0, 0.5] if with_times else [None, None])


def test_unknown_format_is_a_value_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        read_trace(path)


def test_scale_records_times_lengths_and_clip(mooncake):
    scaled = scale_records(read_trace(mooncake), time_scale=0.1, length_scale=0.02,
                           max_input_len=20)
    assert [r.timestamp_s for r in scaled] == pytest.approx([0.0, 0.2, 0.25])
    # 600*0.02 = 12; 1100*0.02 = 22 clipped to 20; 40*0.02 = 0.8 -> 1; outputs floor at 1
    assert [(r.input_len, r.output_len) for r in scaled] == [(12, 1), (20, 1), (1, 1)]
    assert scaled[1].hash_ids == (0, 2, 3)


def test_trace_workload_replays_scaled_timestamps(mooncake):
    config = WorkloadConfig(dataset_name="trace", dataset_path=str(mooncake), num_prompts=2,
                            time_scale=2.0)
    specs = build_workload(config)
    assert [(s.arrival_s, s.input_len, s.output_len) for s in specs] == [(0.0, 600, 20),
                                                                         (4.0, 1100, 3)]
    # An explicit rate replaces the timestamps.
    rated = build_workload(WorkloadConfig(dataset_name="trace", dataset_path=str(mooncake),
                                          request_rate=math.inf))
    assert [s.arrival_s for s in rated] == [0.0, 0.0, 0.0]


def test_poisson_arrivals_have_the_requested_rate():
    times = np.asarray(arrival_times(4000, request_rate=20.0, seed=1))
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.07)  # exponential: CV = 1
    assert arrival_times(5, 20.0, seed=1) == arrival_times(5, 20.0, seed=1)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_rate_and_sets_the_spread(burstiness):
    gaps = np.diff(arrival_times(4000, request_rate=10.0, burstiness=burstiness, seed=2))
    assert 1 / gaps.mean() == pytest.approx(10.0, rel=0.08)
    # Gamma(shape k): coefficient of variation 1/sqrt(k).
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


def test_random_workload_lengths_within_range_ratio():
    specs = build_workload(WorkloadConfig(num_prompts=500, random_input_len=100,
                                          random_output_len=10, random_range_ratio=0.5,
                                          request_rate=5.0, max_input_len=140))
    inputs = [s.input_len for s in specs]
    outputs = [s.output_len for s in specs]
    assert min(inputs) >= 50 and max(inputs) == 140
    assert min(outputs) >= 5 and max(outputs) <= 15 and len(set(outputs)) > 5
    assert specs[0].arrival_s == 0.0 and specs[-1].arrival_s > 50


@pytest.mark.parametrize("kwargs", [dict(dataset_name="trace"), dict(random_range_ratio=1.0),
                                    dict(request_rate=0.0), dict(burstiness=-1.0),
                                    dict(num_prompts=0), dict(length_scale=0.0),
                                    dict(trace_format="sharegpt")])
def test_workload_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        WorkloadConfig(**kwargs)
