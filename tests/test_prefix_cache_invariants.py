"""The prefix cache's books under random use (pure Python): allocate, hit, compute, free, evict,
preempt and abort in random order on small pools, with reference counts checked after every
operation. A shadow of each block's content checks that a hit only ever returns a block still
holding that prefix block (eviction really dropped the old hash), and check_invariants that no
block in use is handed out again (its count would disagree with the tables holding it)."""

from __future__ import annotations

import random

import pytest
from policy_harness import make_predictor

from csps.config import SchedulerConfig
from csps.kvcache.block_hash import hash_blocks
from csps.kvcache.kv_cache_manager import KVCacheManager
from csps.kvcache.placement import DistributedKVCacheManager
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

BLOCK = 4


def _prompt(rng: random.Random, stems: list[list[int]]) -> list[int]:
    """A prompt sharing a random part of a random stem (so hits happen), then its own tokens."""
    stem = rng.choice(stems)
    own = [rng.randrange(1000, 2000) for _ in range(rng.randint(1, 12))]
    return stem[:rng.randint(0, len(stem))] + own


@pytest.mark.parametrize("seed", range(6))
def test_random_allocate_hit_free_evict_keeps_counts_and_contents(seed):
    rng = random.Random(seed)
    manager = KVCacheManager(num_blocks=24, block_size=BLOCK)
    stems = [[rng.randrange(100, 200) for _ in range(40)] for _ in range(3)]
    live: dict[str, Request] = {}
    content: dict[int, int] = {}  # block id -> the block hash its KV holds
    hits = 0
    for i in range(400):
        op = rng.random()
        if op < 0.45:  # admit a new request (maybe a hit)
            request = Request(f"r{i}", _prompt(rng, stems), SamplingParams())
            prefix = manager.find_cached_prefix(request, request.num_tokens)
            hashes = hash_blocks(request.prompt_token_ids, BLOCK)
            for j, block_id in enumerate(prefix.block_ids_on(0)):
                assert content[block_id] == hashes[j], "a hit returned a block evicted since"
            if manager.allocate_slots(request.request_id, request.num_tokens, prefix,
                                      num_prompt_tokens=request.num_tokens):
                request.num_computed_tokens = prefix.num_tokens
                live[request.request_id] = request
                hits += prefix.num_tokens
        elif op < 0.75 and live:  # compute some of a request's tokens
            request = live[rng.choice(sorted(live))]
            request.num_computed_tokens = rng.randint(request.num_computed_tokens,
                                                      request.num_tokens)
            table, hashes = manager.block_ids(request.request_id), hash_blocks(
                request.prompt_token_ids[:request.num_computed_tokens], BLOCK)
            for j, block_hash in enumerate(hashes):
                content[table[j]] = block_hash  # the KV the request wrote there
            manager.cache_computed(request, request.num_computed_tokens)
        elif live:  # finish, abort or preempt: all drop the request's references
            request = live.pop(rng.choice(sorted(live)))
            manager.free(request.request_id)
        manager.check_invariants()
    for request_id in list(live):
        manager.free(request_id)
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_total_blocks  # nothing leaked
    assert hits > 0 and manager.block_pool.num_evictions > 0  # both paths were exercised


def _scheduler(policy: str, sp_size: int, num_blocks: int) -> Scheduler:
    """sarathi on one pool, sps2 on per-rank pools; "sps2+" with the configurator choosing
    each long prompt's degree and group (over the uncached part, on ranks holding its prefix)."""
    predictor = make_predictor(sp_size) if policy == "sps2+" else None
    policy = policy.rstrip("+")
    config = SchedulerConfig(policy=policy, max_num_batched_tokens=16, long_prompt_threshold=24,
                             sp_prefill_chunk=8, lockstep=False, max_num_seqs=8)
    manager = (DistributedKVCacheManager(sp_size, num_blocks, BLOCK) if policy == "sps2"
               else KVCacheManager(num_blocks * sp_size, BLOCK))
    return Scheduler(config, manager, 512, predictor)


def _run_random(policy: str, sp_size: int, seed: int) -> int:
    """Steps finish in random order; requests are aborted at random, in flight or waiting; the
    pools are small enough that decodes preempt. Every step leaves consistent books, and at
    the end every block is free (cached blocks stay evictable, none is held). Returns the
    number of preemptions."""
    rng = random.Random(seed)
    sched = _scheduler(policy, sp_size, num_blocks=20 if sp_size == 1 else 48 // sp_size)
    stems = [[rng.randrange(100, 200) for _ in range(60)] for _ in range(2)]
    for i in range(24):
        sched.add_request(Request(f"r{i}", _prompt(rng, stems), SamplingParams(ignore_eos=True),
                                  max_tokens=rng.randint(1, 10)))
    in_flight = []
    for _ in range(3000):
        in_flight += sched.schedule_steps()
        if not in_flight:
            assert not sched.has_unfinished_requests(), "work left but no step"
            break
        step = in_flight.pop(rng.randrange(len(in_flight)))
        if rng.random() < 0.05 and sched.requests:
            sched.abort_requests([rng.choice(sorted(sched.requests))])
        sampled = {r.request_id: 7 for r in step.scheduler_output.scheduled_requests
                   if r.do_sample}
        sched.update_from_step(step, RunnerOutput(sampled))
        sched.check_invariants()
    manager = sched.kv_cache_manager
    assert not sched.requests and manager.num_free_blocks == manager.num_total_blocks
    assert sched.prefix_cache_stats.hits > 0
    return sched.num_preemptions


CONFIGS = [("sarathi", 1), ("sps2", 2), ("sps2", 4), ("sps2+", 4)]


@pytest.mark.parametrize("policy,sp_size", CONFIGS)
@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_with_shared_prefixes_preemption_and_aborts(policy, sp_size, seed):
    _run_random(policy, sp_size, seed)


@pytest.mark.parametrize("policy,sp_size", CONFIGS)
def test_the_random_workloads_do_preempt(policy, sp_size):
    assert sum(_run_random(policy, sp_size, seed) for seed in range(8)) > 0
