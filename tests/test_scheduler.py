"""Scheduler rules, table-driven, with the books checked after every step. Pure Python."""

from __future__ import annotations

import random
import zlib

import pytest

from csps.config import SchedulerConfig
from csps.kvcache.kv_cache_manager import KVCacheManager
from csps.request import Request, RequestStatus, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

BLOCK = 4
EOS = 0



def distinct_prompt(rid: str, prompt_len: int) -> list[int]:
    """Token ids no other request's prompt shares (so the prefix cache never hits by chance)."""
    base = zlib.crc32(rid.encode()) % 100_000 * 10_000
    return list(range(base + 1, base + prompt_len + 1))

def make_scheduler(policy="sarathi", budget=8, num_blocks=64, max_num_seqs=16, max_len=256):
    config = SchedulerConfig(policy=policy, max_num_batched_tokens=budget,
                             max_num_seqs=max_num_seqs)
    return Scheduler(config, KVCacheManager(num_blocks, BLOCK), max_model_len=max_len)


def make_request(rid, prompt_len, max_tokens=4, **params):
    return Request(rid, distinct_prompt(rid, prompt_len), SamplingParams(**params),
                   eos_token_id=EOS, max_tokens=max_tokens)


def step(sched, token=7):
    """One iteration with a fake runner that samples `token` for every do_sample request."""
    out = sched.schedule()
    assert out.total_num_scheduled_tokens <= sched.token_budget
    sampled = {r.request_id: token for r in out.scheduled_requests if r.do_sample}
    updates = sched.update_from_output(out, RunnerOutput(sampled))
    sched.check_invariants()
    return out, updates


def shape(out):
    return [(r.request_id, r.num_scheduled_tokens) for r in out.scheduled_requests]


@pytest.mark.parametrize("policy,prompts,expected", [
    # sarathi: chunks of the budget; the second request's first chunk rides with the first's tail
    ("sarathi", [10, 9], [[("a", 8)], [("a", 2), ("b", 6)]]),
    # vllm: whole prompts only, as many as fit the budget
    ("vllm", [6, 5], [[("a", 6)], [("b", 5)]]),
])
def test_prefill_shapes(policy, prompts, expected):
    sched = make_scheduler(policy, budget=8)
    for rid, n in zip("ab", prompts, strict=True):
        sched.add_request(make_request(rid, n))
    for want in expected:
        out, _ = step(sched)
        assert shape(out) == want


def test_sarathi_decodes_first_then_inflight_then_new():
    sched = make_scheduler("sarathi", budget=8)
    sched.add_request(make_request("a", 3, max_tokens=10))
    step(sched)  # a prefilled, sampled its first token
    sched.add_request(make_request("b", 20))
    sched.add_request(make_request("c", 4))
    out, _ = step(sched)
    assert shape(out) == [("a", 1), ("b", 7)]
    out, _ = step(sched)
    assert shape(out) == [("a", 1), ("b", 7)]
    out, _ = step(sched)  # b has 6 left: its tail, then c's first chunk
    assert shape(out) == [("a", 1), ("b", 6), ("c", 1)]
    assert [r.do_sample for r in out.scheduled_requests] == [True, True, False]


def test_vllm_prefill_first_stalls_decodes():
    sched = make_scheduler("vllm", budget=16)
    sched.add_request(make_request("a", 3, max_tokens=10))
    step(sched)
    sched.add_request(make_request("b", 5))
    out, _ = step(sched)
    assert shape(out) == [("b", 5)]  # the prefill runs alone
    out, _ = step(sched)
    assert shape(out) == [("a", 1), ("b", 1)]


def test_vllm_rejects_prompt_over_budget():
    sched = make_scheduler("vllm", budget=8)
    with pytest.raises(ValueError, match="budget"):
        sched.add_request(make_request("a", 9))


@pytest.mark.parametrize("stop_kw,token,status,count", [
    ({}, EOS, RequestStatus.FINISHED_STOPPED, 1),
    ({"ignore_eos": True}, EOS, RequestStatus.FINISHED_LENGTH, 4),
    ({"stop_token_ids": (7,)}, 7, RequestStatus.FINISHED_STOPPED, 1),
    ({}, 7, RequestStatus.FINISHED_LENGTH, 4),
])
def test_stop_rules(stop_kw, token, status, count):
    sched = make_scheduler()
    req = make_request("a", 3, max_tokens=4, **stop_kw)
    sched.add_request(req)
    while sched.has_unfinished_requests():
        step(sched, token)
    assert req.status == status
    assert len(req.output_token_ids) == count
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 64


def test_max_model_len_ends_request():
    sched = make_scheduler(max_len=6)
    req = make_request("a", 4, max_tokens=100)
    sched.add_request(req)
    while sched.has_unfinished_requests():
        step(sched)
    assert req.status == RequestStatus.FINISHED_LENGTH and req.num_tokens == 6


def test_kv_reserved_for_whole_prompt_at_admission():
    sched = make_scheduler("sarathi", budget=4, num_blocks=5)  # 20 tokens of KV
    sched.add_request(make_request("a", 14))
    sched.add_request(make_request("b", 8))
    out, _ = step(sched)
    assert shape(out) == [("a", 4)]
    assert sched.kv_cache_manager.block_ids("a") == [0, 1, 2, 3]  # all 14 tokens reserved
    assert sched.num_waiting == 1  # b does not fit beside a's reservation


def test_preempts_newest_and_requeues_it_first():
    # 3 blocks of 4 tokens: two 4-token prompts fit, their decodes then run out of KV.
    sched = make_scheduler("sarathi", budget=16, num_blocks=3)
    a, b = make_request("a", 4, max_tokens=8), make_request("b", 4, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # both prefilled: 2 blocks used
    step(sched)  # a takes the third block; b needs one: b (newest) is preempted
    assert b.status == RequestStatus.PREEMPTED and sched.waiting[0] is b
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert len(b.output_token_ids) == 1  # kept: recomputed on readmission
    while a.status == RequestStatus.RUNNING:
        step(sched)
    out, _ = step(sched)  # b comes back and recomputes prompt + its output token
    assert shape(out) == [("b", 5)] and out.scheduled_requests[0].do_sample


def test_abort_frees_blocks_everywhere():
    sched = make_scheduler("sarathi", budget=4)
    for rid in "abc":
        sched.add_request(make_request(rid, 10))
    step(sched)
    step(sched)
    aborted = sched.abort_requests(["a", "c", "zzz"])
    assert [r.request_id for r in aborted] == ["a", "c"]
    sched.check_invariants()
    out, _ = step(sched)
    assert out.finished_request_ids == ["a", "c"]
    sched.abort_requests(["b"])
    sched.check_invariants()
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 64


def test_max_num_seqs_limits_running():
    sched = make_scheduler("sarathi", budget=64, max_num_seqs=2)
    for rid in "abcd":
        sched.add_request(make_request(rid, 3))
    out, _ = step(sched)
    assert [r.request_id for r in out.scheduled_requests] == ["a", "b"]


@pytest.mark.parametrize("policy", ["sarathi", "vllm"])
@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_invariants(policy, seed):
    rng = random.Random(seed)
    sched = make_scheduler(policy, budget=32, num_blocks=24, max_num_seqs=6, max_len=64)
    requests = [make_request(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 12))
                for i in range(30)]
    pending = list(requests)
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            sched.add_request(pending.pop(0))
        if rng.random() < 0.03 and sched.running:
            sched.abort_requests([rng.choice(sched.running).request_id])
        if not sched.has_unfinished_requests() and not pending:
            break
        step(sched, token=rng.randint(1, 9))
    assert not sched.has_unfinished_requests() and not pending
    assert all(r.is_finished for r in requests)
    assert sched.kv_cache_manager.block_pool.num_free_blocks == 24


@pytest.mark.parametrize("start,end", [(0, 3), (2, 7), (5, 7), (3, 5), (0, 7), (6, 7)])
def test_token_ids_between_equals_slicing(start, end):
    req = make_request("a", 5)
    req.output_token_ids = [11, 12]
    assert req.token_ids_between(start, end) == req.all_token_ids[start:end]
