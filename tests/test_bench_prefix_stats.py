"""Prefix-cache figures of `csps bench serve` without a server: the trace's ideal reuse from its
hash ids, the /metrics counters parsed from a Prometheus text fixture and their run deltas,
cached tokens from usage objects, and the summary lines."""

from __future__ import annotations

import pytest

from csps.bench.client import RequestResult
from csps.bench.metrics import summarize
from csps.bench.prefix_cache_stats import (
    PrefixCacheCounters,
    parse_prefix_cache_counters,
    prefix_cache_fields,
)
from csps.bench.report import format_summary
from csps.bench.trace_reuse import trace_reuse
from csps.bench.traces import TraceRecord

METRICS_TEXT = """\
# HELP csps:num_requests_running Requests running.
# TYPE csps:num_requests_running gauge
csps:num_requests_running{model_name="smollm2-135m"} 2.0
# HELP csps:prefix_cache_queries_total Prompt tokens looked up in the prefix cache.
# TYPE csps:prefix_cache_queries_total counter
csps:prefix_cache_queries_total{model_name="smollm2-135m"} 4096.0
csps:prefix_cache_queries_total{model_name="other"} 100.0
# HELP csps:prefix_cache_hits_total Prompt tokens found in the prefix cache.
# TYPE csps:prefix_cache_hits_total counter
csps:prefix_cache_hits_total{model_name="smollm2-135m"} 1024.0
csps:prefix_cache_hits_total{model_name="other"} 50.0
# HELP csps:prompt_tokens_total Prompt tokens.
# TYPE csps:prompt_tokens_total counter
csps:prompt_tokens_total{model_name="smollm2-135m"} 9999.0
"""


def record(input_len: int, *hash_ids: int) -> TraceRecord:
    return TraceRecord(None, input_len, 1, hash_ids)


def test_trace_reuse_counts_leading_blocks_seen_before():
    records = [record(100, 0, 1), record(100, 0, 1, 2), record(30, 0, 1), record(100, 3)]
    # 0; blocks 0, 1 = 64 tokens; 64 capped at 30; 0 -> 94 of 330
    assert trace_reuse(records, 32) == pytest.approx(94 / 330)
    assert trace_reuse(records[:1], 32) == 0.0 and trace_reuse([], 32) == 0.0


def test_trace_reuse_stops_at_the_first_new_block_and_needs_the_same_prefix():
    # block 1 again after a new block 5, and block 1 after another first block: no hits
    records = [record(96, 0, 1, 2), record(96, 0, 5, 2), record(96, 7, 1, 2)]
    assert trace_reuse(records, 32) == pytest.approx(32 / 288)
    with pytest.raises(ValueError):
        trace_reuse(records, 0)


def test_counters_parsed_for_the_model_and_summed_otherwise():
    assert (parse_prefix_cache_counters(METRICS_TEXT, "smollm2-135m")
            == PrefixCacheCounters(queries=4096.0, hits=1024.0))
    assert (parse_prefix_cache_counters(METRICS_TEXT, None)
            == PrefixCacheCounters(queries=4196.0, hits=1074.0))
    vllm = METRICS_TEXT.replace("csps:", "vllm:")
    assert parse_prefix_cache_counters(vllm, "smollm2-135m").hits == 1024.0
    no_cache = "\n".join(line for line in METRICS_TEXT.splitlines() if "prefix" not in line)
    assert parse_prefix_cache_counters(no_cache + "\n", "smollm2-135m") is None
    with pytest.raises(ValueError):
        parse_prefix_cache_counters("<html>not metrics</html>")


def test_run_deltas_and_hit_rate():
    before = PrefixCacheCounters(queries=1000.0, hits=100.0)
    after = PrefixCacheCounters(queries=5096.0, hits=1124.0)
    fields = prefix_cache_fields(before, after)
    assert fields == {"prefix_cache_queries": 4096, "prefix_cache_hits": 1024,
                      "prefix_cache_hit_rate": 0.25}
    assert isinstance(fields["prefix_cache_queries"], int)
    missing = {"prefix_cache_queries": None, "prefix_cache_hits": None,
               "prefix_cache_hit_rate": None}
    assert prefix_cache_fields(None, after) == missing == prefix_cache_fields(before, None)
    assert prefix_cache_fields(after, before) == missing  # counters went down: a restart
    no_queries = prefix_cache_fields(before, before)
    assert no_queries["prefix_cache_queries"] == 0 and no_queries["prefix_cache_hit_rate"] is None


def test_cached_tokens_summarised_over_requests_that_report_them():
    results = [RequestResult(100, 2, ttft_s=0.1, latency_s=0.2, cached_tokens=64),
               RequestResult(100, 2, ttft_s=0.1, latency_s=0.2, cached_tokens=0),
               RequestResult(100, 2, ttft_s=0.1, latency_s=0.2),
               RequestResult(100, 0, error="HTTP 500: boom", cached_tokens=99)]
    summary = summarize(results, 1.0)
    assert summary["total_cached_tokens"] == 64 and summary["mean_cached_tokens"] == 32.0
    assert summary["cached_tokens"] == [64, 0, None, 99]
    plain = summarize(results[2:3], 1.0)
    assert plain["total_cached_tokens"] is None and plain["mean_cached_tokens"] is None
    assert "Prefix cache" not in format_summary(plain)
    text = format_summary({**summary, **prefix_cache_fields(
        PrefixCacheCounters(0.0, 0.0), PrefixCacheCounters(400.0, 100.0))})
    assert "Prefix cache hit rate:" in text and "0.250" in text
