"""Per-instance steps (scheduler/instances.py, step_books.py, sps2.py's schedule_step), pure
Python on a fake clock: components, chunked SP prefill slices that carry the group's decodes,
concurrent steps on disjoint instances, reservation of a long prompt's group, and random
workloads whose steps finish in random order with the books checked after every step."""

from __future__ import annotations

import random

import pytest
from policy_harness import distinct_prompt, make_predictor

from csps.config import SchedulerConfig
from csps.kvcache.placement import DistributedKVCacheManager
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler
from csps.scheduler.instances import components

BLOCK = 4


def make_scheduler(sp_size=4, num_blocks=64, threshold=32, budget=16, chunk=8, predictor=None,
                   degrees=None, max_num_seqs=16, consolidate=0.0):
    config = SchedulerConfig(policy="sps2", max_num_batched_tokens=budget,
                             long_prompt_threshold=threshold, sp_prefill_chunk=chunk,
                             lockstep=False, max_num_seqs=max_num_seqs,
                             consolidate_decode_kv=consolidate)
    return Scheduler(config, DistributedKVCacheManager(sp_size, num_blocks, BLOCK), 512,
                     predictor, degrees)


def make_request(rid, prompt_len, max_tokens=4):
    return Request(rid, distinct_prompt(rid, prompt_len), SamplingParams(ignore_eos=True),
                   eos_token_id=0, max_tokens=max_tokens)


def finish(sched, step):
    sampled = {r.request_id: 7 for r in step.scheduler_output.scheduled_requests if r.do_sample}
    updates = sched.update_from_step(step, RunnerOutput(sampled))
    sched.check_invariants()
    return updates


def run_all(sched, rng=None, limit=2000):
    """Drive every step to completion (in random order with rng); the steps, in start order."""
    started, in_flight = [], []
    for _ in range(limit):
        new = sched.schedule_steps()
        started += new
        in_flight += new
        busy = [i for s in in_flight for i in s.instances]
        assert len(busy) == len(set(busy)), "two steps in flight on one instance"
        ids = [r.request_id for s in in_flight for r in s.scheduler_output.scheduled_requests]
        assert len(ids) == len(set(ids)), "a request in two steps at once"
        if not in_flight:
            assert not sched.has_unfinished_requests(), "work left but no step"
            return started
        step = in_flight.pop(rng.randrange(len(in_flight)) if rng else 0)
        finish(sched, step)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("spans, expected", [
    ([], [(0,), (1,), (2,), (3,)]),
    ([(0, 1)], [(0, 1), (2,), (3,)]),
    ([(1, 2), (2, 3)], [(0,), (1, 2, 3)]),
    ([(0, 1, 2, 3), (1,)], [(0, 1, 2, 3)]),
    ([(2,), (0, 1)], [(0, 1), (2,), (3,)]),
])
def test_components_join_overlapping_spans(spans, expected):
    assert components(4, spans) == expected


def test_a_long_prompt_prefills_in_slices_that_carry_the_groups_decodes():
    sched = make_scheduler(sp_size=2, chunk=8)
    sched.add_request(make_request("short", 6, max_tokens=20))
    (first,) = sched.schedule_steps()
    finish(sched, first)  # the short prompt's whole prefill on one rank
    sched.add_request(make_request("long", 40))
    slices = []
    while sched.requests["long"].is_prefill:
        steps = sched.schedule_steps()
        assert len(steps) == 1
        (step,) = steps
        by_id = {r.request_id: r for r in step.scheduler_output.scheduled_requests}
        assert "short" in by_id and by_id["short"].is_decode  # the decode rides with the slice
        slices.append(by_id["long"])
        finish(sched, step)
    assert [s.num_computed_tokens for s in slices] == [0, 16, 32]
    assert [s.sp_chunk_lens for s in slices] == [(8, 8), (8, 8), (4, 4)]
    assert [s.do_sample for s in slices] == [False, False, True]
    # each slice sees the KV written so far, chunk r on rank r
    assert [(t.rank, t.start, t.end) for t in slices[1].kv_ranges] == [
        (0, 0, 8), (1, 8, 16), (0, 16, 24), (1, 24, 32)]
    assert len(sched.requests["short"].output_token_ids) == 1 + len(slices)


def test_a_sub_group_prefill_runs_beside_steps_on_other_instances():
    predictor = make_predictor(4)
    sched = make_scheduler(sp_size=4, chunk=8, predictor=predictor, degrees=(1, 2))
    sched.add_request(make_request("a", 6, max_tokens=30))
    finish(sched, sched.schedule_steps()[0])
    where_a = sched.kv_cache_manager.placement("a").ranks
    sched.add_request(make_request("long", 64))
    steps = sched.schedule_steps()
    by_instances = {s.instances: s for s in steps}
    long_step = next(s for s in steps if any(r.request_id == "long"
                                             for r in s.scheduler_output.scheduled_requests))
    assert len(long_step.instances) == 2 and not set(where_a) & set(long_step.instances)
    a_step = next(s for s in steps if s is not long_step)
    assert a_step.instances == tuple(where_a)  # "a" decodes at once, beside the SP prefill
    # while the long prompt's slice is in flight, "a" keeps decoding on its own instance
    for _ in range(3):
        finish(sched, a_step)
        (a_step,) = sched.schedule_steps()
        assert a_step.instances == tuple(where_a)
    assert len(sched.requests["a"].output_token_ids) == 4
    assert by_instances


def test_a_long_prompt_reserves_its_group_and_others_go_on():
    sched = make_scheduler(sp_size=2, chunk=8, budget=4)
    sched.add_request(make_request("a", 12, max_tokens=8))  # 3 chunks of 4 on one rank
    (step,) = sched.schedule_steps()
    sched.add_request(make_request("long", 40))
    sched.add_request(make_request("b", 4, max_tokens=8))
    others = sched.schedule_steps()  # the free rank may not start: the long prompt's group
    assert others == [] and sched.reserved == (0, 1)
    finish(sched, step)
    (step,) = sched.schedule_steps()
    ids = {r.request_id for r in step.scheduler_output.scheduled_requests}
    assert step.instances == (0, 1) and "long" in ids and sched.reserved is None


@pytest.mark.parametrize("sp_size, degrees, chunk", [(2, None, 8), (4, None, 4), (4, (1, 2), 8),
                                                     (4, (1, 2, 4), 0), (3, (1, 2, 3), 4)])
@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_finish_with_steps_in_random_order(sp_size, degrees, chunk, seed):
    rng = random.Random(seed)
    predictor = make_predictor(sp_size) if degrees else None
    sched = make_scheduler(sp_size=sp_size, num_blocks=24, chunk=chunk, predictor=predictor,
                           degrees=degrees, threshold=24)
    for i in range(14):
        sched.add_request(make_request(f"r{i}", rng.choice([3, 9, 20, 30, 50, 70]),
                                       max_tokens=rng.randint(1, 12)))
    steps = run_all(sched, rng)
    assert not sched.kv_cache_manager.num_total_blocks - sched.kv_cache_manager.num_free_blocks
    assert max(len(s.instances) for s in steps) >= 1


def test_aborting_a_request_in_flight_frees_it_after_its_step():
    sched = make_scheduler(sp_size=2, chunk=8)
    sched.add_request(make_request("long", 40))
    (step,) = sched.schedule_steps()
    sched.abort_requests(["long"])
    assert finish(sched, step) == []
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_total_blocks
    assert sched.schedule_steps() == [] or True
    assert not sched.has_unfinished_requests()


@pytest.mark.parametrize("with_predictor", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_consolidated_requests_decode_on_one_instance_and_free_everything(with_predictor,
                                                                         seed):
    """--consolidate-decode-kv on a random workload with aborts, steps finishing in random
    order: an SP prefill's last slice moves its KV (when a rank of its group has room), the
    request then decodes over KV on that rank alone, led by it, and no block is left."""
    rng = random.Random(seed)
    sched = make_scheduler(sp_size=4, num_blocks=96, chunk=4, threshold=24, consolidate=100.0,
                           predictor=make_predictor(4) if with_predictor else None,
                           degrees=(1, 2, 3, 4) if with_predictor else None)
    for i in range(14):
        sched.add_request(make_request(f"r{i}", rng.choice([9, 30, 50, 70]),
                                       max_tokens=rng.randint(1, 12)))
    aborted = {f"r{i}" for i in rng.sample(range(14), 3)}
    started, in_flight = [], []
    for _ in range(3000):
        new = sched.schedule_steps()
        started += new
        in_flight += new
        if not in_flight:
            break
        step = in_flight.pop(rng.randrange(len(in_flight)))
        ids = {r.request_id for r in step.scheduler_output.scheduled_requests}
        if ids & aborted and rng.random() < 0.5:  # abort while its step runs
            sched.abort_requests(sorted(ids & aborted))
            aborted -= ids
        finish(sched, step)
    assert not sched.has_unfinished_requests()
    manager = sched.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks
    moved_at = {m.request_id: i for i, s in enumerate(started)
                for m in s.scheduler_output.kv_moves}
    last_slices = {r.request_id for s in started for r in s.scheduler_output.scheduled_requests
                   if r.is_sp_prefill and r.do_sample}
    assert set(moved_at) == last_slices  # every rank has room for any of these prompts
    for i, s in enumerate(started):
        for m in s.scheduler_output.kv_moves:  # one destination, inside the step
            assert m.dst.rank in s.instances and m.src.rank in s.instances
        for r in s.scheduler_output.scheduled_requests:
            if r.request_id in moved_at and i > moved_at[r.request_id]:
                # a decode over KV on one rank (its step is that instance's, or another
                # prompt's slice it rides in when that prompt's group covers it)
                (rank,) = {t.rank for t in r.kv_ranges}
                assert r.is_decode and r.leader == rank and rank in s.instances
