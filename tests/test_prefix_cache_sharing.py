"""Requests that start alike at the same time share one prefill (pure Python, fake runner): a
request whose next block another request is computing waits until it is cached, so `n`
samples of one prompt, or one document asked twice at once, compute the prompt once. A lossy
(CSA) prefill is never waited for."""

from __future__ import annotations

import pytest

from csps.config import SchedulerConfig
from csps.contract.sp_attention import SpAttention
from csps.kvcache.kv_cache_manager import KVCacheManager
from csps.kvcache.placement import DistributedKVCacheManager
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

BLOCK = 4
PROMPT = list(range(100, 190))  # 90 tokens: 22 whole blocks short of the last token


def _run(sched: Scheduler, num_requests: int) -> list[Request]:
    requests = [Request(f"r{i}", list(PROMPT), SamplingParams(ignore_eos=True), max_tokens=3)
                for i in range(num_requests)]
    for request in requests:
        sched.add_request(request)
    computed = 0
    for _ in range(500):
        steps = sched.schedule_steps()
        if not steps:
            break
        for step in steps:
            computed += step.scheduler_output.num_prefill_tokens
            sampled = {r.request_id: 7 for r in step.scheduler_output.scheduled_requests
                       if r.do_sample}
            sched.update_from_step(step, RunnerOutput(sampled))
            sched.check_invariants()
    assert not sched.has_unfinished_requests()
    sched.prefill_tokens_computed = computed
    return requests


@pytest.mark.parametrize("policy,sp_size", [("sarathi", 1), ("sps2", 2), ("sps2", 4)])
def test_samples_of_one_prompt_compute_it_once(policy, sp_size):
    config = SchedulerConfig(policy=policy, max_num_batched_tokens=32, long_prompt_threshold=48,
                             sp_prefill_chunk=8, lockstep=False)
    manager = (KVCacheManager(256, BLOCK) if sp_size == 1
               else DistributedKVCacheManager(sp_size, 128, BLOCK))
    sched = Scheduler(config, manager, 512, num_instances=sp_size)
    first, *others = _run(sched, 4)
    assert first.num_cached_tokens == 0
    # the others wait for the first's prefill; each then computes only what its placement
    # cannot take from the cache
    assert all(r.num_cached_tokens >= 80 for r in others), [r.num_cached_tokens for r in others]
    assert sched.prefill_tokens_computed < 2 * len(PROMPT)


def test_a_lossy_prefill_is_not_waited_for():
    config = SchedulerConfig(policy="sps2", max_num_batched_tokens=32, long_prompt_threshold=48,
                             sp_prefill_chunk=8, lockstep=False)
    sched = Scheduler(config, DistributedKVCacheManager(2, 128, BLOCK), 512,
                      sp_attention=SpAttention.parse("csa", "1:1,2:2"))
    requests = _run(sched, 3)
    assert all(r.num_cached_tokens == 0 for r in requests)  # CSA KV is never shared
    assert sched.prefill_tokens_computed == 3 * len(PROMPT)
