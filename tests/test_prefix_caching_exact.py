"""Prefix caching is exact: with the cache on, greedy outputs and first-token logits equal a run
without it (fp32, within 1e-4), on one rank and over P = 2 and 4 gloo ranks (sps2 on steps),
for SP attention ulysses, ring and CSA at stride 1.

A long "doc" prompt runs first (an SP prefill over the group, so its cached KV is spread over
the ranks), and a short one on a single rank. Then, together: the doc's first 96 tokens (whole
blocks) and 40 new ones (the rest long enough for an SP prefill), its first 98 (not whole
blocks: 96 are cached) and 10 new ones, the doc itself again (fully cached: the last block is
recomputed for its logits), the short prompt extended (its prefix cached on one rank), and the
doc's first 112 tokens and one more (over SP ranks a rest must give every rank of its group
some tokens, so the prefix gives back a block and 5 tokens are computed).
Each must hit the cache for exactly the tokens predicted, and compute what a single worker
without any cache computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_distributed

from csps.config import SchedulerConfig
from csps.contract.sp_attention import SpAttention
from csps.engine.worker import Worker
from csps.kvcache.kv_cache_manager import KVCacheManager
from csps.kvcache.placement import DistributedKVCacheManager
from csps.model.loader import read_arch_config
from csps.parallel.groups import init_parallel_groups
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

pytestmark = pytest.mark.slow

BLOCK = 4
NUM_BLOCKS = 80  # per rank
MAX_TOKENS = 6
LOGIT_TOL = 1e-4
ALGORITHMS = {"ulysses": "", "ring": "", "csa": None}  # csa: stride 1 at every level
CSA_STRIDE_1 = {2: "1:1,2:1", 4: "1:1,2:1,4:1"}
# request -> tokens its admission finds cached (BLOCK = 4: whole blocks short of the last token;
# over an SP group, "tail" gives one block back so that both or all 4 ranks compute some)
EXPECTED_HITS = {"whole": 96, "part": 96, "again": 124, "short2": 8, "tail": 112}
SP_HITS = {**EXPECTED_HITS, "tail": 108}


def _worker(model_dir, groups=None):
    """A worker recording each request's first-token logits: the row ending its prompt (not a
    later leader's decode rows)."""
    prompt_lens = {rid: len(ids) for phase in _phases(read_arch_config(model_dir).vocab_size)
                   for rid, ids in phase.items()}
    worker = Worker(model_dir, read_arch_config(model_dir), "float32", "cpu", NUM_BLOCKS, BLOCK,
                    seed=0, groups=groups)
    worker.first_logits = {}
    sample = worker.runner.sampler.sample

    def recording(logits, requests):
        for row, request in enumerate(requests):
            if request.num_computed_tokens + request.num_scheduled_tokens == prompt_lens[
                    request.request_id]:
                worker.first_logits.setdefault(request.request_id, logits[row].clone())
        return sample(logits, requests)
    worker.runner.sampler.sample = recording
    return worker


def _phases(vocab_size: int) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(2)

    def tokens(n):
        return torch.randint(3, vocab_size, (n,), generator=gen).tolist()
    doc, short, new = tokens(128), tokens(9), tokens(64)
    return [{"doc": doc, "short": short},
            {"whole": doc[:96] + new[:40], "part": doc[:98] + new[40:50], "again": list(doc),
             "short2": short + new[50:56], "tail": doc[:112] + new[56:57]}]


def _run(scheduler: Scheduler, phases, execute) -> dict:
    """Each phase's requests together, the next phase after they all finish."""
    results = {}
    for phase in phases:
        requests = [Request(rid, ids, SamplingParams(temperature=0, ignore_eos=True),
                            max_tokens=MAX_TOKENS) for rid, ids in phase.items()]
        for request in requests:
            scheduler.add_request(request)
        while scheduler.has_unfinished_requests():
            execute()
            scheduler.check_invariants()
        results.update({r.request_id: (r.output_token_ids, r.num_cached_tokens)
                        for r in requests})
    return results


def _cached_rank(rank: int, world_size: int, model_dir) -> dict:
    groups = init_parallel_groups(world_size, 1, backend="gloo")
    phases = _phases(read_arch_config(model_dir).vocab_size)
    results = {}
    for algorithm, levels in ALGORITHMS.items():
        worker = _worker(model_dir, groups)
        config = SchedulerConfig(policy="sps2", long_prompt_threshold=32,
                                 max_num_batched_tokens=32, lockstep=False, sp_prefill_chunk=8)
        scheduler = Scheduler(config, DistributedKVCacheManager(world_size, NUM_BLOCKS, BLOCK),
                              256, num_instances=world_size,
                              sp_attention=SpAttention.parse(algorithm,
                                                             levels or CSA_STRIDE_1[world_size]))

        def execute(scheduler=scheduler, worker=worker):
            for step in scheduler.schedule_steps():
                out = worker.execute_step(step) if groups.sp_rank in step.instances \
                    else RunnerOutput()
                outputs = [None] * groups.world_size
                dist.all_gather_object(outputs, out, group=groups.cpu_group)
                scheduler.update_from_step(step, RunnerOutput.merge(outputs))
        got = _run(scheduler, phases, execute)
        results[algorithm] = {"requests": got, "logits": dict(worker.first_logits),
                              "hits": scheduler.prefix_cache_stats.hits}
    return results


def _one_rank(model_dir, caching: bool) -> dict:
    worker = _worker(model_dir)
    scheduler = Scheduler(SchedulerConfig(policy="sarathi", max_num_batched_tokens=32),
                          KVCacheManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=caching), 256)

    def execute():
        output = scheduler.schedule()
        scheduler.update_from_output(output, worker.execute_model(output))
    got = _run(scheduler, _phases(read_arch_config(model_dir).vocab_size), execute)
    return {"requests": got, "logits": dict(worker.first_logits)}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return _one_rank(tiny_model_dir, caching=False)


def _assert_same(got: dict, want: dict, what: str) -> None:
    for rid, (tokens, _) in want["requests"].items():
        assert got["requests"][rid][0] == tokens, f"{what}: {rid}'s greedy tokens"
        torch.testing.assert_close(got["logits"][rid], want["logits"][rid], atol=LOGIT_TOL,
                                   rtol=LOGIT_TOL, msg=lambda m, r=rid: f"{what} {r}: {m}")


def test_one_rank_with_the_cache_computes_what_it_computes_without(tiny_model_dir, reference):
    assert all(hits == 0 for _, hits in reference["requests"].values())
    cached = _one_rank(tiny_model_dir, caching=True)
    assert {rid: hits for rid, (_, hits) in cached["requests"].items()
            if hits} == EXPECTED_HITS
    _assert_same(cached, reference, "one rank")


@pytest.mark.parametrize("sp_size", [2, 4])
def test_sp_ranks_with_the_cache_compute_what_one_worker_computes(tiny_model_dir, reference,
                                                                  sp_size):
    results = run_distributed(_cached_rank, sp_size, tiny_model_dir, timeout_s=400)
    for algorithm in ALGORITHMS:
        per_rank = [r[algorithm] for r in results]
        hits = {rid: n for rid, (_, n) in per_rank[0]["requests"].items() if n}
        assert hits == SP_HITS, algorithm
        logits = {}
        for rank_result in per_rank:  # each request is sampled by exactly one rank
            for rid, row in rank_result["logits"].items():
                assert rid not in logits, f"{algorithm}: {rid} sampled on two ranks"
                logits[rid] = row
        _assert_same({"requests": per_rank[0]["requests"], "logits": logits}, reference,
                     f"P={sp_size} {algorithm}")
        for rank_result in per_rank[1:]:
            assert rank_result["requests"] == per_rank[0]["requests"]
