"""The sps2 configurator (pure Python): per long prompt, the SP degree, group, CSA levels and
micro-batch of least predicted TTFT, subject to the KV fitting; short prompts stay local."""

from __future__ import annotations

import random

import pytest
from policy_harness import (
    FakeCostModel,
    make_predictor,
    make_request,
    make_scheduler,
    run,
    step,
)

from csps.contract.sp_attention import SpAttention
from csps.kvcache.prefix_cache import NO_PREFIX


def sps2(sp_size, cost=None, degrees=None, num_blocks=64, parallel=None, **config):
    predictor = make_predictor(sp_size, cost, **(parallel or {}))
    config = {"long_prompt_threshold": 20, "max_num_batched_tokens": 8, **config}
    return make_scheduler("sps2", sp_size, predictor, num_blocks=num_blocks, degrees=degrees,
                          **config), predictor


def test_long_prompts_go_sp_over_the_group_and_short_ones_stay_local():
    sched, _ = sps2(2)
    sched.add_request(make_request("long", 64))
    (r,) = step(sched).scheduled_requests
    assert r.sp_chunk_lens == (32, 32) and r.leader == 1
    assert r.sp_attention == SpAttention("ulysses")  # the deployment's, decided whole
    sched.add_request(make_request("short", 12))
    step(sched)  # the long request's first decode (prefill and decode alternate)
    out = step(sched)
    assert [(x.request_id, x.sp_chunk_lens, x.num_scheduled_tokens)
            for x in out.scheduled_requests] == [("short", None, 8)]


def test_a_long_prompt_goes_local_when_the_predictor_says_sp_is_slower():
    sched, _ = sps2(2, FakeCostModel(per_byte=1.0))  # SP's all-to-all bytes cost 1 s each
    sched.add_request(make_request("long", 64))
    out = step(sched)
    assert [(r.sp_chunk_lens, r.num_scheduled_tokens) for r in out.scheduled_requests] == [
        (None, 8)]


@pytest.mark.parametrize("per_rank,degree", [(0.005, 4), (0.012, 2)])
def test_the_degree_follows_the_predictor(per_rank, degree):
    # 64 tokens at 1 ms each over d ranks plus per_rank per rank: d=4 wins when ranks are
    # cheap, d=2 when each rank costs 12 ms (32+24 < 16+48 ms; d=3: 24+36)
    sched, _ = sps2(4, FakeCostModel(per_token=1e-3, per_pair=0, per_rank=per_rank),
                    degrees=(1, 2, 3, 4))
    sched.add_request(make_request("long", 64))
    (r,) = step(sched).scheduled_requests
    assert sum(1 for n in r.sp_chunk_lens if n) == degree


def test_a_sub_group_is_the_contiguous_one_with_most_free_blocks():
    cost = FakeCostModel(per_token=1e-3, per_pair=0, per_rank=0.012)
    sched, _ = sps2(4, cost, degrees=(1, 2, 4), num_blocks=16)
    sched.add_request(make_request("a", 12, max_tokens=50))  # local, on rank 0
    sched.add_request(make_request("b", 12, max_tokens=50))  # local, on rank 1
    step(sched)
    step(sched)
    sched.add_request(make_request("long", 64))
    out = None
    while out is None or not any(r.is_sp_prefill for r in out.scheduled_requests):
        out = step(sched)
    (r,) = out.scheduled_requests
    assert r.sp_chunk_lens == (0, 0, 32, 32) and r.leader == 3
    assert {x.rank for x in r.kv_ranges} == {2, 3}


def test_kv_fit_overrules_the_predictor():
    # one rank holds 32 tokens: a 48-token prompt goes SP though local is predicted faster
    sched, _ = sps2(2, FakeCostModel(per_byte=1.0), num_blocks=8)
    sched.add_request(make_request("long", 48))
    (r,) = step(sched).scheduled_requests
    assert r.sp_chunk_lens == (24, 24)


def test_nothing_is_admitted_when_no_candidate_fits():
    sched, _ = sps2(2, num_blocks=8)
    sched.add_request(make_request("a", 60, max_tokens=30))
    step(sched)
    sched.add_request(make_request("b", 40))
    for _ in range(3):
        assert "b" not in {r.request_id for r in step(sched).scheduled_requests}
    assert sched.waiting[0].request_id == "b"


@pytest.mark.parametrize("candidates,levels", [("1:1,P:2;1:1,P:8", "1:1,2:8"),
                                                ("1:1,P:2", "1:1,2:2"), ("1:1,P:4", None)])
def test_csa_levels_are_chosen_by_predicted_time(candidates, levels):
    # a sparser far level sends fewer bytes and attends fewer pairs, so it is predicted
    # faster; P stands for the degree; a candidate that misfits leaves the engine's levels
    sched, _ = sps2(2, FakeCostModel(per_byte=1e-6, per_pair=1e-4), parallel={
        "sp_attention": "csa", "csa_levels": "1:1,2:4"}, sps2_csa_candidates=candidates)
    sched.add_request(make_request("long", 128))
    (r,) = step(sched).scheduled_requests
    assert r.is_sp_prefill and r.sp_attention.csa.text == (levels or "1:1,2:4")


def test_csa_levels_of_a_sub_group_name_its_degree():
    sched, _ = sps2(4, FakeCostModel(per_token=1e-3, per_pair=0, per_rank=0.012),
                    degrees=(1, 2, 4), parallel={"sp_attention": "csa"},
                    sps2_csa_candidates="1:1,P:2")
    sched.add_request(make_request("long", 64))
    (r,) = step(sched).scheduled_requests
    assert r.sp_chunk_lens == (32, 32, 0, 0) and r.sp_attention.csa.text == "1:1,2:2"


@pytest.mark.parametrize("per_collective,micro_batch", [(0.0, "1x16"), (0.01, None)])
def test_micro_batch_is_chosen_by_predicted_time(per_collective, micro_batch):
    # pipelining hides bytes behind compute but makes more collectives
    sched, _ = sps2(2, FakeCostModel(per_byte=1e-6, per_collective=per_collective),
                    parallel={"sp_attention": "csa"}, sps2_micro_batch_candidates="none;1x16")
    sched.add_request(make_request("long", 128))
    (r,) = step(sched).scheduled_requests
    csa = r.sp_attention.csa
    assert r.is_sp_prefill and csa.text == "1:1,2:2"  # the engine's levels, every time
    assert (csa.micro_batch_heads, csa.micro_batch_tokens) == ((1, 16) if micro_batch
                                                               else (0, 0))


@pytest.mark.parametrize("sp_size,degrees,seed", [(2, None, 0), (4, (1, 2, 3, 4), 1)])
def test_random_workload_on_a_fake_clock_finishes_and_keeps_the_books(sp_size, degrees, seed):
    rng = random.Random(seed)
    sched, predictor = sps2(sp_size, degrees=degrees, num_blocks=16, max_num_seqs=6,
                            max_num_batched_tokens=16)
    arrivals = [(rng.uniform(0, 0.5), make_request(f"r{i}", rng.randint(1, 90),
                                                   rng.randint(1, 8))) for i in range(30)]
    aborts = {rng.uniform(0, 0.5): f"r{i}" for i in rng.sample(range(30), 4)}
    trace = run(sched, predictor, arrivals, aborts)
    aborted = set(aborts.values())
    assert {f"r{i}" for i in range(30)} - aborted <= set(trace.finished_s)
    assert sched.kv_cache_manager.num_free_blocks == 16 * sp_size


def _slo_choice(slo_tbt, prompt_len=256, sp_size=2):
    sched, predictor = sps2(sp_size, num_blocks=128, slo_tbt=slo_tbt, lockstep=False)
    request = make_request("long", prompt_len)
    sched.add_request(request)
    return sched.policy.configurator.choose(sched, request), predictor


def test_slo_tbt_picks_the_least_ttft_slice_whose_step_fits():
    loose, _ = _slo_choice(10.0)
    assert loose.chunk == 0 and loose.step_s <= 10.0  # no slicing needed: the whole prompt
    whole_s = loose.step_s
    tight, predictor = _slo_choice(whole_s * 0.5)
    assert 0 < tight.chunk and tight.step_s <= whole_s * 0.5
    assert tight.ttft_s >= loose.ttft_s  # slicing costs (per-step overhead, prefix reads)
    # every candidate that fits has no smaller TTFT than the choice
    sched, _ = sps2(2, num_blocks=128, slo_tbt=whole_s * 0.5, lockstep=False)
    request = make_request("long", 256)
    candidates = sched.policy.configurator._candidates(
        sched, (request, NO_PREFIX), tight.degree, 0.0, [128, 128], 0.0)
    fitting = [c for c in candidates if c.step_s <= whole_s * 0.5]
    assert fitting and min(c.ttft_s for c in fitting) == pytest.approx(tight.ttft_s)


def test_sliced_time_sums_every_slice_priced_with_its_prefix():
    """The closed form (first, last full and final slice) equals pricing each slice."""
    _, predictor = _slo_choice(None)
    from csps.scheduler.slicing import sliced_time
    from csps.scheduler.sp_books import slice_prompt

    group, n, chunk, block = (0, 1), 200, 32, 4
    total, longest = sliced_time(n, group, chunk, block, 2, predictor.sp_prefill_time)
    slices, held, times = slice_prompt(n, list(group), 2, chunk, block), [0, 0], []
    for lens in slices:
        times.append(predictor.sp_prefill_time(list(lens),
                                               prefix_lens=held if sum(held) else None))
        held = [h + x for h, x in zip(held, lens, strict=True)]
    assert len(slices) == 4
    assert total == pytest.approx(sum(times)) and longest == pytest.approx(max(times))


def test_slo_tbt_without_a_cost_model_is_refused():
    from csps.config import SchedulerConfig
    from csps.scheduler.policies import make_policy

    with pytest.raises(ValueError, match="slo-tbt needs a cost model"):
        make_policy(SchedulerConfig(policy="sps2", slo_tbt=0.1), predictor=None)
