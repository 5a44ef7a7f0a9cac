"""Three of LoongServe's rules in the loongserve policy on per-instance steps (pure Python, fake
clock): ring chunks balanced for causal work, the admission test's idle count by KV capacity,
and bounded out-of-order admission. Each test also runs the rule switched off, and shows it
behaving differently."""

from __future__ import annotations

import random

import pytest
from policy_harness import make_request
from test_loongserve_steps import Clock, first_ring_prefill, loong

from csps.kvcache.causal_split import causal_balanced_split
from csps.kvcache.placement import split_prompt
from csps.scheduler.loongserve_admission import LoongServeAdmission


def rank_work(lens, per_token, per_pair):
    work, before = [], 0
    for n in lens:
        work.append(per_token * n + per_pair * n * (before + n / 2))
        before += n
    return work


@pytest.mark.parametrize("n,parts", [(1000, 4), (4096, 2), (777, 3), (100_003, 8)])
def test_the_causal_split_gives_every_rank_the_same_work(n, parts):
    per_token, per_pair, block = 1e-4, 1e-5, 4
    lens = causal_balanced_split(n, parts, block, per_token, per_pair)
    assert sum(lens) == n and all(x % block == 0 for x in lens[:-1]) and min(lens) > 0
    assert lens == sorted(lens, reverse=True)  # earlier ranks attend to fewer keys
    work = rank_work(lens, per_token, per_pair)
    one_block = per_token * block + per_pair * block * n  # the most a block boundary moves
    assert max(work) - min(work) <= 2 * one_block
    even = rank_work(split_prompt(n, parts, block), per_token, per_pair)
    assert max(work) < 0.8 * max(even)  # the even split's last rank does the most


def test_the_causal_split_falls_back_to_the_even_split():
    assert causal_balanced_split(10, 4, 4, 1e-4, 1e-5) == split_prompt(10, 4, 4)  # too short
    assert causal_balanced_split(1000, 4, 4, 1e-4, 0.0) == split_prompt(1000, 4, 4)  # linear
    with pytest.raises(ValueError):
        causal_balanced_split(100, 0, 4, 1e-4, 1e-5)


def test_a_ring_prefill_gives_earlier_instances_longer_chunks_and_ends_sooner():
    _, predictor, clock, r = first_ring_prefill()
    group = [i for i, n in enumerate(r.sp_chunk_lens) if n]
    chunks = [r.sp_chunk_lens[i] for i in group]
    assert len(group) > 1 and chunks == sorted(chunks, reverse=True) and chunks[0] > chunks[-1]
    even = [0] * 4
    for rank, n in zip(group, split_prompt(480, len(group), 4), strict=True):
        even[rank] = n
    assert predictor.sp_prefill_time(r.sp_chunk_lens) < 0.9 * predictor.sp_prefill_time(even)
    clock.run()


def started_at(clock, request_id):
    """When the first step carrying the request started."""
    return min(start for start, _, step in clock.started
               if request_id in {r.request_id for r in step.scheduler_output.scheduled_requests})


def _busy_decodes(sched, clock, count=6):
    """`count` short requests decoding on both instances of a 2-instance engine."""
    for i in range(count):
        sched.add_request(make_request(f"d{i}", 5, max_tokens=12))
    while any(not sched.requests[f"d{i}"].output_token_ids for i in range(count)):
        clock.launch()
        clock.finish_next()
    assert {i for r in sched.running for i in sched.span_of(r.request_id)} == {0, 1}


@pytest.mark.parametrize("by_capacity", [True, False])
def test_the_admission_test_counts_idle_instances_by_kv_capacity(by_capacity, monkeypatch):
    """Every instance runs decodes but holds little KV: LoongServe counts it as idle (its KV
    would fit elsewhere), so a short prompt starts now, borrowing an instance for one step.
    Counting only instances without decodes, the test weighs pausing six young decodes
    against one prompt and makes it wait until the decodes finish."""
    sched, predictor = loong(2, num_blocks=100)
    if not by_capacity:
        monkeypatch.setattr(type(sched.policy), "idle_capacity",
                            LoongServeAdmission.idle_capacity)
    clock = Clock(sched, predictor)
    _busy_decodes(sched, clock)
    sched.add_request(make_request("b", 30, max_tokens=2))
    arrived = clock.now
    clock.run()
    first_decode_done = min(clock.token_times[f"d{i}"][-1] for i in range(6))
    if by_capacity:
        assert started_at(clock, "b") < first_decode_done
        assert len([t for t in clock.token_times["d0"] if t <= started_at(clock, "b")]) < 10
    else:
        assert started_at(clock, "b") >= first_decode_done > arrived


@pytest.mark.parametrize("max_num_ooe", [10, 0])
def test_a_short_prompt_may_pass_a_long_head_the_admission_test_refuses(max_num_ooe):
    """Decodes near their end run on instances 0-1; the long head would prefill much slower
    on the idle instances than on all four, more than the decodes' expected wait, so the test
    refuses it for now. Out-of-order admission (LoongServe's max_num_ooe) lets the short
    prompt behind it start on an idle instance; strict FCFS keeps it behind the head."""
    sched, predictor = loong(4, num_blocks=100)
    sched.policy.max_num_ooe = max_num_ooe
    clock = Clock(sched, predictor)
    sched.policy.fit(4, 512, 4)
    sched.policy.fits = {1: sched.policy.fits[1]}  # the decodes prefill on one instance each
    for rid in ("d0", "d1"):
        sched.add_request(make_request(rid, 5, max_tokens=12))
        clock.launch()
    while any(len(sched.requests[r].output_token_ids) < 3 for r in ("d0", "d1")):
        clock.launch()
        clock.finish_next()
    sched.policy.fits = None
    sched.add_request(make_request("long", 480, max_tokens=2))
    sched.add_request(make_request("short", 8, max_tokens=2))
    clock.run()
    assert {"long", "short"} <= set(clock.first_token_s)
    if max_num_ooe:
        assert started_at(clock, "short") < started_at(clock, "long")
    else:
        assert started_at(clock, "short") >= started_at(clock, "long")


def test_a_new_plan_starts_beside_a_group_that_waits_for_its_instances():
    """Each planned group has its reservation: while one waits for a busy instance of its
    group, a plan made later starts on free instances outside it (with one reservation at a
    time, nothing could start until the first group had). The run still ends with every
    request served and no KV held."""
    rng = random.Random(7)
    sched, predictor = loong(4, num_blocks=100, max_num_seqs=12)
    clock, beside = Clock(sched, predictor), []
    launch = clock.launch

    def launch_and_look():
        waiting_groups = dict(sched.reservations)
        before = len(clock.started)
        launch()
        for _, _, step in clock.started[before:]:
            starts = {r.request_id for r in step.scheduler_output.scheduled_requests
                      if r.num_computed_tokens == 0}
            for rid, group in waiting_groups.items():
                if rid in sched.reservations and starts and not set(group) & set(
                        step.instances):
                    beside.append((rid, step.instances))
    clock.launch = launch_and_look
    arrivals = [(rng.uniform(0, 1.0), make_request(f"r{i}", rng.choice([8, 40, 300, 480]),
                                                   rng.randint(2, 30))) for i in range(30)]
    clock.run(arrivals)
    assert beside, "no plan ever started beside a waiting group"
    assert {f"r{i}" for i in range(30)} <= set(clock.first_token_s)
    assert sched.kv_cache_manager.num_free_blocks == 4 * 100 and not sched.reservations
