"""Benchmark metrics on hand-made request records, the result file name, and `bench compare`."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from csps.bench.client import RequestResult
from csps.bench.compare import baseline_index, compare_files, ratio
from csps.bench.metrics import GoodputSLOs, summarize, tpot_s
from csps.bench.report import default_filename, format_summary


def records() -> list[RequestResult]:
    return [
        # ttft 0.1 s, 5 tokens, latency 0.5 s -> tpot 0.1 s
        RequestResult(input_len=100, output_len=5, ttft_s=0.1, itls_s=[0.1] * 4, latency_s=0.5,
                      start_s=0.0),
        # ttft 0.3 s, 3 tokens, latency 0.7 s -> tpot 0.2 s
        RequestResult(input_len=200, output_len=3, ttft_s=0.3, itls_s=[0.1, 0.3], latency_s=0.7,
                      start_s=0.5),
        # a single token: no TPOT sample
        RequestResult(input_len=50, output_len=1, ttft_s=0.2, latency_s=0.2, start_s=1.0),
        RequestResult(input_len=70, output_len=0, latency_s=0.01, start_s=1.5,
                      error="HTTP 500: boom"),
    ]


def test_summary_counts_and_throughputs():
    result = summarize(records(), duration_s=2.0)
    assert (result["completed"], result["failed"]) == (3, 1)
    assert result["total_input_tokens"] == 350 and result["total_output_tokens"] == 9
    assert result["request_throughput"] == pytest.approx(1.5)
    assert result["output_throughput"] == pytest.approx(4.5)
    assert result["total_token_throughput"] == pytest.approx(179.5)
    assert result["request_goodput"] is None  # no SLOs given


def test_summary_latency_statistics_ms():
    result = summarize(records(), duration_s=2.0)
    assert result["mean_ttft_ms"] == pytest.approx(200.0)
    assert result["median_ttft_ms"] == pytest.approx(200.0)
    assert result["std_ttft_ms"] == pytest.approx(81.6496, rel=1e-4)
    assert result["p90_ttft_ms"] == pytest.approx(280.0)  # linear interpolation, as numpy
    assert result["p99_ttft_ms"] == pytest.approx(298.0)
    assert result["mean_tpot_ms"] == pytest.approx(150.0)  # (100 + 200) / 2
    assert result["mean_itl_ms"] == pytest.approx(800 / 6)  # pooled over requests
    assert result["p99_itl_ms"] == pytest.approx(290.0)
    assert result["mean_e2el_ms"] == pytest.approx(1400 / 3)
    assert result["median_e2el_ms"] == pytest.approx(500.0)


def test_normalized_latencies_and_per_request_arrays():
    result = summarize(records(), duration_s=2.0)
    per_token = (0.5 / 105 + 0.7 / 203 + 0.2 / 51) / 3 * 1000
    assert result["mean_normalized_latency_ms"] == pytest.approx(per_token)
    assert result["mean_latency_per_output_token_ms"] == pytest.approx((100 + 700 / 3 + 200) / 3)
    assert result["mean_ttft_per_input_token_ms"] == pytest.approx((1 + 1.5 + 4) / 3)
    assert result["input_lens"] == [100, 200, 50, 70]
    assert result["output_lens"] == [5, 3, 1, 0]
    assert result["itls"][1] == [0.1, 0.3] and result["start_times"] == [0.0, 0.5, 1.0, 1.5]
    assert result["errors"] == ["", "", "", "HTTP 500: boom"]


def test_goodput_counts_requests_meeting_every_slo():
    slos = GoodputSLOs.parse(["ttft:250", "tpot:150"])
    # request 1 meets both; request 2 misses ttft (300 > 250); request 3 has tpot 0
    assert summarize(records(), 2.0, slos)["request_goodput"] == pytest.approx(1.0)
    assert summarize(records(), 2.0, GoodputSLOs(e2el_ms=600))["request_goodput"] == 1.0
    assert tpot_s(records()[2]) == 0.0


@pytest.mark.parametrize("items", [["ttft"], ["latency:5"], ["ttft:-1"], ["tpot:x"]])
def test_goodput_parse_rejects_bad_slos(items):
    with pytest.raises(ValueError):
        GoodputSLOs.parse(items)


def test_summary_without_successes_and_format():
    result = summarize([records()[3]], duration_s=1.0)
    assert result["completed"] == 0 and result["mean_ttft_ms"] == 0.0
    text = format_summary(summarize(records(), 2.0))
    assert "Successful requests:" in text and "error: HTTP 500: boom" in text


def test_default_filename():
    when = datetime(2025, 1, 2, 3, 4, 5)
    assert (default_filename("sps2-csa", 2.0, 8, "/models/smollm2-135m", when)
            == "sps2-csa-2qps-concurrency8-smollm2-135m-20250102-030405.json")
    assert default_filename("x", None, None, "org/m", when) == "x-infqps-m-20250102-030405.json"
    assert (default_filename("x", None, None, "m", when, is_replay=True)
            == "x-trace-m-20250102-030405.json")


def write(path, label, **metrics):
    path.write_text(json.dumps({"label": label, "completed": 10, "failed": 0, **metrics}))
    return path


def test_compare_table_with_ratios(tmp_path):
    base = write(tmp_path / "a.json", "vllm", mean_ttft_ms=200.0, output_throughput=100.0,
                 request_goodput=None)
    other = write(tmp_path / "b.json", "sps2-csa", mean_ttft_ms=100.0, output_throughput=150.0)
    md = tmp_path / "t.md"
    table = compare_files([base, other], out_md=md)
    lines = table.splitlines()
    assert lines[0] == "| metric | vllm (baseline) | sps2-csa |"
    assert "| mean TTFT (ms) | 200.00 | 100.00 (2.00x) |" in lines
    assert "| output throughput (tok/s) | 100.00 | 150.00 (1.50x) |" in lines
    assert "| request goodput (req/s) | - | - |" in lines
    assert "| completed | 10 | 10 |" in lines
    assert md.read_text().strip() == table
    flipped = compare_files([base, other], baseline="sps2-csa")
    assert "| mean TTFT (ms) | 200.00 (0.50x) | 100.00 |" in flipped.splitlines()


def test_baseline_and_ratio_rules():
    assert baseline_index(["a", "b"], None) == 0
    assert baseline_index(["a", "b"], "b") == 1 and baseline_index(["a", "b"], "1") == 1
    with pytest.raises(ValueError):
        baseline_index(["a", "b"], "c")
    assert ratio(50.0, 100.0, -1) == 2.0 and ratio(50.0, 100.0, 1) == 0.5
    assert ratio(0.0, 0.0, -1) == 1.0 and ratio(None, 1.0, 1) is None and ratio(3, 4, 0) is None
