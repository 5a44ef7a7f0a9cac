"""The reuse a workload offers from its hash ids alone (bench/trace_reuse.py), worked out by
hand, and on the Mooncake trace when the shared data is there; the same rate as the bench's
csps/bench/trace_reuse.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from csps.bench.trace_reuse import reuse_of
from csps.bench.trace_reuse import trace_reuse as bench_trace_reuse
from csps.bench.workload import RequestSpec

MOONCAKE = Path(__file__).parents[1] / "../shared/data/traces/mooncake_conversation.jsonl"


def specs(requests) -> list[RequestSpec]:
    return [RequestSpec(0.0, n, 1, ids) for n, ids in requests]


def test_leading_ids_seen_before_count_whole_hash_blocks_capped_at_the_prompt():
    requests = [(30, (0, 1, 2)),  # first: nothing seen
                (40, (0, 1, 3, 4)),  # 0, 1 seen: 20
                (25, (0, 1, 3)),  # 0, 1, 3 seen: 30 capped at 25
                (30, (9, 1, 2)),  # 1, 2 seen, but after 9 (another prefix): 0
                (10, ()),  # no ids: 0
                (30, (0, 1, 2))]  # the first again: all 30
    reuse = reuse_of(requests, block_tokens=10)
    assert reuse.reused_tokens == 20 + 25 + 30 and reuse.input_tokens == 165
    assert reuse.reuse_rate == pytest.approx(75 / 165)
    assert (reuse.num_requests, reuse.num_requests_reusing) == (6, 3)
    assert reuse.reused_per_request == (0, 20, 25, 0, 0, 30)
    assert bench_trace_reuse(specs(requests), 10) == pytest.approx(reuse.reuse_rate)


def test_kv_block_granularity_keeps_whole_blocks_and_recomputes_the_last_token():
    requests = [(30, (0, 1, 2)), (40, (0, 1, 3, 4)), (25, (0, 1, 3)), (30, (0, 1, 2))]
    # 20 -> 16; min(25, 24) = 24 -> 24; min(30, 29) = 29 -> 24
    assert reuse_of(requests, 10, kv_block_size=8).reused_tokens == 16 + 24 + 24
    assert reuse_of(requests, 10, kv_block_size=1).reused_tokens == 20 + 24 + 29


def test_empty_and_bad_arguments():
    assert reuse_of([]).reuse_rate == 0.0
    with pytest.raises(ValueError):
        reuse_of([], block_tokens=0)
    with pytest.raises(ValueError):
        reuse_of([], kv_block_size=0)


@pytest.mark.skipif(not MOONCAKE.exists(), reason="the shared Mooncake trace is not here")
def test_the_mooncake_conversation_trace_reuses_a_fifth_of_its_first_thousand_prompts():
    from csps.bench.traces import read_trace

    records = read_trace(MOONCAKE)[:1000]
    reuse = reuse_of((r.input_len, r.hash_ids) for r in records)
    assert 0.2 < reuse.reuse_rate < 0.23  # 21.6%: later turns resend earlier ones
    assert bench_trace_reuse(records, 512) == pytest.approx(reuse.reuse_rate)
    cached = reuse_of(((r.input_len, r.hash_ids) for r in records), kv_block_size=16)
    assert reuse.reuse_rate - 0.001 < cached.reuse_rate <= reuse.reuse_rate
