"""The loongserve policy's lock-step variant (`--lockstep`; pure Python): the batching DP and
its cost fit, scale-down plans, instance borrowing, the admission test, multi-master
rebalancing, and the books under random workloads with aborts on a fake clock."""

from __future__ import annotations

import random

import pytest
from policy_harness import FakeCostModel, make_predictor, make_request, make_scheduler, run, step

from csps.config import EngineConfig, ParallelConfig, SchedulerConfig
from csps.scheduler.loongserve_batching import PrefillCostFit, fit_prefill_cost, plan_prefill


def loong(sp_size, cost=None, num_blocks=64, degrees=None, **config):
    config.setdefault("lockstep", True)  # these tests drive iterations over every instance
    predictor = make_predictor(sp_size, cost, sp_attention="ring")
    return make_scheduler("loongserve", sp_size, predictor, num_blocks=num_blocks,
                          degrees=degrees, **config), predictor


def test_the_cost_fit_recovers_a_quadratic():
    truth = PrefillCostFit(0.5, 2e-3, 3e-7)
    batches = [[n] for n in (16, 64, 256, 1024)] + [[n, n] for n in (64, 512)]
    fit = fit_prefill_cost([(b, truth.batch_time(b)) for b in batches])
    assert fit.a == pytest.approx(0.5) and fit.b == pytest.approx(2e-3)
    assert fit.c == pytest.approx(3e-7)


@pytest.mark.parametrize("max_sp_batch,expected_cost,groups", [
    # both on the 2-rank group: T2 = 1 + 0.25*(64+16) = 21, times 1/8 + 1/4
    (0, 21 * 0.375, [((0, 1), (0, 1))]),
    # one request per SP group: each alone on a rank, 64/8 + 16/4
    (1, 12.0, [((0,), (0,)), ((1,), (1,))]),
])
def test_the_dp_on_a_hand_computed_case(max_sp_batch, expected_cost, groups):
    fits = {1: PrefillCostFit(0, 0, 1.0), 2: PrefillCostFit(1.0, 0, 0.25)}  # T1 = sum l^2
    plans = plan_prefill([8, 4], [8, 4], [0, 1], lambda r: 100, fits, max_sp_batch)
    assert plans[0] is None
    assert plans[1].cost == pytest.approx(80 * 0.375)  # both in one batch on one rank
    assert plans[2].cost == pytest.approx(expected_cost)
    assert [(g.requests, g.ranks) for g in plans[2].groups] == groups


def test_the_dp_respects_free_kv():
    fits = {1: PrefillCostFit(0, 1.0, 0), 2: PrefillCostFit(0, 0.1, 0)}
    free = {0: 10, 1: 10}
    plans = plan_prefill([16], [16], [0, 1], free.get, fits)
    assert plans[1] is None and plans[2].groups[0].ranks == (0, 1)


def test_scale_down_keeps_kv_on_the_fewest_most_free_ranks():
    sched, _ = loong(4, num_blocks=25)
    manager = sched.kv_cache_manager
    for rank, used in enumerate((15, 0, 10, 20)):  # free: 40, 100, 60, 20 tokens
        if used:
            manager.allocate_prefill(f"x{rank}", [used * 4], [rank])
    sched.add_request(make_request("long", 120))
    plan = sched.policy.scale_down_plan(sched, sched.waiting[0], (0, 1, 2, 3))
    assert plan.chunk_lens == (28, 28, 32, 32)  # 30 blocks over 4 ranks, block-aligned
    assert plan.kv_ranks[:2] == (1, 2) and plan.kv_lens[:2] == (100, 20)
    assert set(plan.kv_lens[2:]) == {0} and sorted(plan.kv_ranks) == [0, 1, 2, 3]


def test_a_ring_prefill_lands_on_fewer_ranks_than_computed_it():
    sched, _ = loong(4, num_blocks=16)  # 64 tokens per rank: 100 cannot go local
    sched.add_request(make_request("long", 100))
    (r,) = step(sched).scheduled_requests
    assert r.sp_chunk_lens == (24, 24, 24, 28) and r.leader == 3
    assert [(x.rank, x.start, x.end) for x in r.kv_ranges] == [(0, 0, 64), (1, 64, 100)]
    (d,) = step(sched).scheduled_requests
    assert d.is_decode and d.leader in (0, 1)


def _borrow_case(cost):
    """'a' has decoded 400 tokens on rank 0 (rank 1 idle) when the long 'b' arrives."""
    sched, predictor = loong(2, cost, num_blocks=160)
    sched.add_request(make_request("a", 5, max_tokens=1000))
    policy = sched.policy
    policy.fit(2, 512, 4)
    fits, policy.fits = policy.fits, {1: policy.fits[1]}  # 'a' prefills locally
    step(sched)
    policy.fits = fits
    for _ in range(399):
        step(sched)
    assert sched.kv_cache_manager.placement("a").ranks == [0]
    sched.add_request(make_request("b", 96))
    return sched


@pytest.mark.parametrize("cost,borrows", [
    (FakeCostModel(per_token=1e-3, per_pair=1e-4), True),  # SP halves a quadratic prefill
    (FakeCostModel(per_token=1e-3, per_pair=0, per_collective=0.02), False),  # SP is slower
])
def test_ranks_are_borrowed_from_decodes_only_when_the_test_passes(cost, borrows):
    sched = _borrow_case(cost)
    policy, decodes = sched.policy, [sched.requests["a"]]
    admitted = policy.admit(sched, decodes)
    assert [r.request_id for r in admitted] == ["b"]
    plans = policy._plans(sched, admitted, policy.rank_order(sched, decodes))
    gain = plans[1].cost - plans[2].cost
    loss = plans[2].time_s * 1 / sched.requests["a"].num_tokens  # a's whole length so far
    assert (gain > loss) == borrows
    out = step(sched)
    ids = {(r.request_id, r.is_sp_prefill) for r in out.scheduled_requests}
    assert ids == ({("b", True)} if borrows else {("a", False), ("b", False)})
    if not borrows:  # b runs whole on the idle rank while a decodes
        (b,) = [r for r in out.scheduled_requests if r.request_id == "b"]
        assert b.leader == 1 and b.num_scheduled_tokens == 96


@pytest.mark.parametrize("max_tokens,admitted", [(202, False), (600, True)])
def test_admission_waits_when_the_decodes_finish_soon(max_tokens, admitted):
    # one rank: 'b' can only run by pausing 'a' (8 + 200 tokens); it is admitted when its
    # prefill, weighted by 1/208, costs less than waiting for 'a' weighted by 1/len(b)
    sched, _ = loong(1, FakeCostModel(per_token=1e-3, per_pair=1e-5), num_blocks=256)
    sched.add_request(make_request("a", 8, max_tokens=max_tokens))
    for _ in range(200):
        step(sched)
    sched.add_request(make_request("b", 200))
    ids = [r.request_id for r in step(sched).scheduled_requests]
    assert ids == (["b"] if admitted else ["a"])
    while "b" in {r.request_id for r in sched.waiting}:
        step(sched)  # a waiting 'b' is admitted once 'a' is done at the latest
    assert not admitted or "a" in sched.requests


def test_masters_are_rebalanced_under_compute_pressure():
    sched, _ = loong(2, num_blocks=64)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 40, max_tokens=20))
    while sched.waiting or any(r.is_prefill for r in sched.running):
        step(sched)
    manager = sched.kv_cache_manager
    on_rank1 = {r.request_id for r in sched.running if 1 in manager.placement(r.request_id).ranks}
    assert on_rank1 and len(sched.running) == 4
    for r in sched.running:
        sched.set_leader(r.request_id, 0)
    sched.policy.rebalance_masters(sched, list(sched.running))
    led_by_1 = {r.request_id for r in sched.running if sched.leader_of(r.request_id) == 1}
    assert len(led_by_1) == min(2, len(on_rank1)) and led_by_1 <= on_rank1


def test_engine_config_runs_loongserve_with_ring_attention():
    config = EngineConfig(scheduler=SchedulerConfig(policy="loongserve"),
                          parallel=ParallelConfig(sequence_parallel_size=2))
    assert config.parallel.sp_attention == "ring"
    with pytest.raises(ValueError, match="ring"):
        EngineConfig(scheduler=SchedulerConfig(policy="loongserve"),
                     parallel=ParallelConfig(sequence_parallel_size=2, sp_attention="csa"))
    with pytest.raises(ValueError, match="loongserve"):
        EngineConfig(scheduler=SchedulerConfig(policy="sarathi"),
                     parallel=ParallelConfig(sequence_parallel_size=2))


def test_loongserve_needs_a_cost_model():
    with pytest.raises(ValueError, match="cost model"):
        make_scheduler("loongserve", 2, None)


@pytest.mark.parametrize("sp_size,simulator,seed", [(1, False, 0), (2, False, 1), (4, False, 2),
                                                    (4, True, 3)])
def test_random_workloads_with_aborts_finish_without_leaking_kv(sp_size, simulator, seed):
    rng = random.Random(seed)
    degrees = tuple(range(1, sp_size + 1)) if simulator else None
    sched, predictor = loong(sp_size, num_blocks=24, degrees=degrees, max_num_seqs=6,
                             loongserve_sp_batch=0 if simulator else 1)
    if simulator:
        sched.policy.sp_prefill_alone = False
    longest = 90 if sp_size > 1 else 80
    arrivals = [(rng.uniform(0, 1.0), make_request(f"r{i}", rng.randint(1, longest),
                                                   rng.randint(1, 12))) for i in range(30)]
    aborts = {rng.uniform(0, 1.0): f"r{i}" for i in rng.sample(range(30), 4)}
    trace = run(sched, predictor, arrivals, aborts)
    assert {f"r{i}" for i in range(30)} - set(aborts.values()) <= set(trace.finished_s)
    assert sched.kv_cache_manager.num_free_blocks == 24 * sp_size
    for _, out in trace.steps:
        sp = [r for r in out.scheduled_requests if r.is_sp_prefill]
        if sp and not simulator:
            assert len(out.scheduled_requests) == 1  # the workers run an SP prefill alone


def test_long_prompts_are_not_starved_by_steady_decodes():
    # both ranks decode requests with long prompts; a long prompt arrives. Pausing a decode
    # costs its normalised latency 1/(its whole length, prompt + output) per second, as the
    # waiting prompt's delay costs it 1/len: with decodes far from done, admit it now
    # (weighting a decode by 1/(tokens output so far) would starve the prompt for ~2000 steps)
    predictor = make_predictor(2, FakeCostModel(per_token=1e-3, per_pair=1e-6),
                               sp_attention="ring")
    sched = make_scheduler("loongserve", 2, predictor, num_blocks=2048, max_len=4096,
                           lockstep=True)
    for rid in ("a", "b"):
        sched.add_request(make_request(rid, 400, max_tokens=2000))
    for _ in range(20):
        step(sched)
    assert all(r.num_computed_tokens > 400 for r in sched.running)  # both decoding
    sched.add_request(make_request("long", 800))
    assert "long" in {r.request_id for r in step(sched).scheduled_requests}
    assert {"a", "b"} <= set(sched.requests)
