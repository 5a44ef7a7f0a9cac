"""The sps2 policy on an SP group (pure Python): where prompts go, how iterations alternate,
where decode KV lands, and that the books stay consistent under random load."""

from __future__ import annotations

import random
import zlib

import pytest

from csps.config import SchedulerConfig
from csps.kvcache.placement import DistributedKVCacheManager, split_prompt
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

BLOCK = 4



def distinct_prompt(rid: str, prompt_len: int) -> list[int]:
    """Token ids no other request's prompt shares (so the prefix cache never hits by chance)."""
    base = zlib.crc32(rid.encode()) % 100_000 * 10_000
    return list(range(base + 1, base + prompt_len + 1))

def make_scheduler(sp_size=2, num_blocks=64, threshold=20, budget=8, max_num_seqs=16,
                   max_len=512, hybrid=False):
    config = SchedulerConfig(policy="sps2", max_num_batched_tokens=budget,
                             max_num_seqs=max_num_seqs, long_prompt_threshold=threshold,
                             hybrid_batching=hybrid)
    return Scheduler(config, DistributedKVCacheManager(sp_size, num_blocks, BLOCK),
                     max_model_len=max_len)


def make_request(rid, prompt_len, max_tokens=4):
    return Request(rid, distinct_prompt(rid, prompt_len), SamplingParams(ignore_eos=True),
                   eos_token_id=0, max_tokens=max_tokens)


def step(sched):
    decodes_due = any(not r.is_prefill for r in sched.running)
    out = sched.schedule()
    out.decodes_due = decodes_due
    out.kinds = {"sp" if r.is_sp_prefill else "decode" if r.num_computed_tokens
                 >= sched.requests[r.request_id].num_prompt_tokens else "prefill"
                 for r in out.scheduled_requests}
    sampled = {r.request_id: 7 for r in out.scheduled_requests if r.do_sample}
    sched.update_from_output(out, RunnerOutput(sampled))
    sched.check_invariants()
    return out


def kinds(out):
    """'sp' for an SP prefill, 'prefill' for local chunks, 'decode' for decode steps."""
    return out.kinds


def test_a_long_prompt_prefills_whole_over_the_group_and_its_last_rank_leads():
    sched = make_scheduler(sp_size=3)
    sched.add_request(make_request("long", 50))
    out = step(sched)
    (r,) = out.scheduled_requests
    assert r.sp_chunk_lens == tuple(split_prompt(50, 3, BLOCK)) and sum(r.sp_chunk_lens) == 50
    assert r.num_scheduled_tokens == 50 and r.do_sample and r.leader == 2
    assert [(x.rank, x.start, x.end) for x in r.kv_ranges] == [(0, 0, 16), (1, 16, 32),
                                                              (2, 32, 50)]
    assert r.is_distributed and r.block_ids == []


def test_sp_decodes_are_led_by_the_least_busy_rank():
    sched = make_scheduler(sp_size=3)
    for i in range(3):
        sched.add_request(make_request(f"long{i}", 50, max_tokens=8))
    for _ in range(5):  # prefill, decode, prefill, decode, prefill
        out = step(sched)
        if "sp" in out.kinds:
            assert out.scheduled_requests[0].leader == 2  # the last rank samples the prefill
    out = step(sched)
    leaders = sorted(r.leader for r in out.scheduled_requests)
    assert out.kinds == {"decode"} and leaders == [0, 1, 2]


def test_a_short_prompt_runs_in_chunks_on_the_rank_with_most_free_blocks():
    sched = make_scheduler(sp_size=2)
    sched.add_request(make_request("long", 40))
    step(sched)  # ranks now hold 5 (rank 0) and 5 (rank 1) blocks
    sched.add_request(make_request("short", 12))
    out = step(sched)  # decode of "long" was due, but prefill and decode alternate
    assert kinds(out) == {"decode"}
    out = step(sched)
    (r,) = out.scheduled_requests
    assert (r.request_id, r.num_scheduled_tokens, r.sp_chunk_lens) == ("short", 8, None)
    assert {x.rank for x in r.kv_ranges} == {r.leader} and len(r.block_ids) == 3
    rank = r.leader
    assert kinds(step(sched)) == {"decode"}
    out = step(sched)
    assert [(x.request_id, x.num_scheduled_tokens, x.leader) for x in out.scheduled_requests] == [
        ("short", 4, rank)]


def test_prefill_and_decode_iterations_alternate_and_never_mix():
    sched = make_scheduler(sp_size=2, threshold=16)
    for i in range(6):
        sched.add_request(make_request(f"r{i}", 24 if i % 2 else 10, max_tokens=6))
    history = []
    while sched.has_unfinished_requests():
        out = step(sched)
        assert len(out.kinds) == 1, f"iteration {out.iteration} mixes {out.kinds}"
        if "sp" in out.kinds:
            assert len(out.scheduled_requests) == 1
        if history and history[-1] != {"decode"} and out.decodes_due:
            assert out.kinds == {"decode"}, "a decode waited two prefill iterations"
        history.append(out.kinds)
    assert {"sp"} in history and {"prefill"} in history and {"decode"} in history


def test_hybrid_batching_lets_chunks_ride_with_decodes():
    sched = make_scheduler(sp_size=2, threshold=10**6, hybrid=True)
    sched.add_request(make_request("a", 6, max_tokens=8))
    step(sched)  # a's whole prompt; its first token
    sched.add_request(make_request("b", 30))
    out = step(sched)
    assert out.kinds == {"decode", "prefill"}
    assert [(r.request_id, r.num_scheduled_tokens) for r in out.scheduled_requests] == [
        ("a", 1), ("b", 7)]


def test_hybrid_batching_still_runs_an_sp_prefill_alone_before_decodes():
    sched = make_scheduler(sp_size=2, threshold=20, hybrid=True)
    sched.add_request(make_request("a", 6, max_tokens=8))
    step(sched)
    sched.add_request(make_request("long", 40))
    out = step(sched)
    assert out.kinds == {"sp"} and out.decodes_due  # "a" waits one iteration, not forever
    assert step(sched).kinds == {"decode"}


def test_decode_kv_is_appended_on_the_least_loaded_rank_of_the_group():
    sched = make_scheduler(sp_size=2)
    sched.add_request(make_request("big", 26, max_tokens=20))
    out = step(sched)
    assert out.scheduled_requests[0].sp_chunk_lens == (12, 14)  # 3 blocks on rank 0, 4 on 1
    manager = sched.kv_cache_manager
    while manager.placement("big").num_tokens < 36:
        out = step(sched)
        assert all(r.is_distributed and r.is_decode for r in out.scheduled_requests)
    # 26, 27 fill rank 1's last block; 28.. open a block on rank 0 (3 blocks < 4), and at the
    # 4-4 tie the next block stays on the lowest rank
    assert [(x.rank, x.start, x.end) for x in manager.placement("big").ranges] == [
        (0, 0, 12), (1, 12, 28), (0, 28, 36)]


def test_a_request_larger_than_one_rank_is_served_by_the_group():
    sched = make_scheduler(sp_size=2, num_blocks=6, threshold=1000)  # 24 tokens per rank
    sched.add_request(make_request("big", 40, max_tokens=4))  # > one rank: goes SP anyway
    out = step(sched)
    assert out.scheduled_requests[0].sp_chunk_lens == (20, 20)
    while sched.has_unfinished_requests():
        step(sched)
    assert sched.kv_cache_manager.num_free_blocks == 12


@pytest.mark.parametrize("sp_size,seed", [(1, 0), (2, 1), (3, 2), (4, 3)])
def test_random_workload_keeps_the_books(sp_size, seed):
    rng = random.Random(seed)
    sched = make_scheduler(sp_size=sp_size, num_blocks=12, threshold=24, budget=16,
                           max_num_seqs=5, max_len=120)
    longest = 60 if sp_size > 1 else 36  # one rank holds 48 tokens
    pending = [make_request(f"r{i}", rng.randint(1, longest), rng.randint(1, 10))
               for i in range(30)]
    for _ in range(2000):
        if pending and rng.random() < 0.3:
            sched.add_request(pending.pop())
        if sched.running and rng.random() < 0.05:
            sched.abort_requests([rng.choice(sched.running).request_id])
        out = step(sched)
        assert len(kinds(out)) <= 1
        if not pending and not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.num_free_blocks == 12 * sp_size
