"""sps2 on per-instance steps admits FCFS per instance (pure Python, fake runner): a short
request waiting for the busy instance that holds its cached prefix does not hold up the
requests behind it on a free instance, and it is still admitted where its prefix lies."""

from __future__ import annotations

from csps.config import SchedulerConfig
from csps.kvcache.placement import DistributedKVCacheManager
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

BLOCK = 4
DOC = list(range(100, 140))  # 40 tokens: a conversation's first turn


def _request(rid: str, tokens: list[int], max_tokens: int) -> Request:
    return Request(rid, tokens, SamplingParams(ignore_eos=True), max_tokens=max_tokens)


def _finish(sched: Scheduler, steps) -> None:
    for _ in range(200):
        for step in steps:
            sampled = {r.request_id: 7 for r in step.scheduler_output.scheduled_requests
                       if r.do_sample}
            sched.update_from_step(step, RunnerOutput(sampled))
            sched.check_invariants()
        steps = sched.schedule_steps()
        if not steps:
            return
    raise AssertionError("requests left unfinished")


def test_a_request_waiting_for_its_prefix_rank_lets_the_next_one_run_elsewhere():
    config = SchedulerConfig(policy="sps2", max_num_batched_tokens=64, long_prompt_threshold=64,
                             sp_prefill_chunk=16, lockstep=False)
    manager = DistributedKVCacheManager(2, 64, BLOCK)
    sched = Scheduler(config, manager, 256, num_instances=2)
    first = _request("first", DOC, max_tokens=1)
    sched.add_request(first)
    _finish(sched, sched.schedule_steps())
    holder = manager.find_cached_prefix(first, len(DOC)).ranks
    assert len(holder) == 1
    holder, other = holder[0], 1 - holder[0]

    busy = _request("busy", DOC + [1, 2, 3, 4], max_tokens=4)  # pinned to the holder
    sched.add_request(busy)
    in_flight = sched.schedule_steps()
    assert [s.instances for s in in_flight] == [(holder,)]  # left running: the holder is busy

    follow_up = _request("follow-up", DOC + [5, 6, 7, 8, 9, 10, 11, 12], max_tokens=2)
    fresh = _request("fresh", list(range(500, 520)), max_tokens=2)
    sched.add_request(follow_up)
    sched.add_request(fresh)
    steps = sched.schedule_steps()
    ran = {r.request_id: s.instances for s in steps
           for r in s.scheduler_output.scheduled_requests}
    assert ran == {"fresh": (other,)}  # the follow-up waits for the holder, fresh passes it
    assert list(sched.waiting) == [follow_up]

    _finish(sched, in_flight + steps)
    assert follow_up.num_cached_tokens >= 36  # admitted where its prefix lies
    assert not sched.has_unfinished_requests()
