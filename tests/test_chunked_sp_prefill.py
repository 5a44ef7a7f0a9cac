"""Chunked SP prefill on real gloo groups: a long prompt prefilled over P = 2 and 4 ranks in 1, 2
and 4 slices, each later slice attending to the earlier slices' KV where they lie (q-move prefix
exchange, parallel/sp_prefix.py), while a short request's decodes ride in the same steps.

Every rank runs the same sps2 Scheduler on per-instance steps and the engine's loop over its
steps (a rank runs the steps of its instances; the step's RunnerOutputs are merged as the
executor merges them). Checked against one single-process Worker (fp32): the long prompt's
first-token logits within 1e-4 for ulysses, allgather_kv, ring and CSA at stride 1, and both
requests' greedy continuations identical.
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
NUM_BLOCKS = 64  # per rank
MAX_TOKENS = 8
PROMPT_LENS = (9, 128)  # a short prompt (decoding while the long one prefills), a long one
LOGIT_TOL = 1e-4
ALGORITHMS = {"ulysses": "", "allgather_kv": "", "ring": ""}  # name -> CSA levels
# tokens per rank of a slice giving 1, 2 and 4 slices of the 128-token prompt
CHUNKS = {2: {1: 0, 2: 32, 4: 16}, 4: {1: 0, 2: 16, 4: 8}}
CSA_STRIDE_1 = {2: "1:1,2:1", 4: "1:1,2:1,4:1"}


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _worker(model_dir, groups=None, sp_attention="ulysses", csa_levels="1:1,2:2") -> Worker:
    worker = Worker(model_dir, read_arch_config(model_dir), "float32", "cpu", NUM_BLOCKS, BLOCK,
                    seed=0, groups=groups, sp_attention=sp_attention, csa_levels=csa_levels)
    worker.first_logits = {}  # request id -> the logits of its first sampled token
    sample = worker.runner.sampler.sample

    def recording(logits, requests):
        for row, request in enumerate(requests):
            worker.first_logits.setdefault(request.request_id, logits[row].clone())
        return sample(logits, requests)
    worker.runner.sampler.sample = recording
    return worker


def _requests(prompts):
    return [Request(f"r{i}", p, SamplingParams(temperature=0, ignore_eos=True),
                    max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)]


def _serve_steps(worker: Worker, scheduler: Scheduler, prompts, groups) -> dict:
    """The engine loop on steps: every rank books every step; a step's ranks run it."""
    requests = _requests(prompts)
    for request in requests:
        scheduler.add_request(request)
    slices = hybrid = 0
    while scheduler.has_unfinished_requests():
        for step in scheduler.schedule_steps():
            mine = groups.sp_rank in step.instances
            out = worker.execute_step(step) if mine else RunnerOutput()
            outputs = [None] * groups.world_size
            dist.all_gather_object(outputs, out, group=groups.cpu_group)
            scheduler.update_from_step(step, RunnerOutput.merge(outputs))
            scheduled = step.scheduler_output.scheduled_requests
            slices += sum(r.is_sp_prefill for r in scheduled)
            hybrid += any(r.is_sp_prefill for r in scheduled) and any(r.is_decode
                                                                      for r in scheduled)
            scheduler.check_invariants()
    return {"tokens": [r.output_token_ids for r in requests], "slices": slices, "hybrid": hybrid,
            "logits": worker.first_logits.get("r1")}


def _chunked_rank(rank: int, world_size: int, model_dir) -> dict:
    groups = init_parallel_groups(world_size, 1, backend="gloo")
    prompts = _prompts(read_arch_config(model_dir).vocab_size)
    results = {}
    for algorithm, levels in {**ALGORITHMS, "csa": CSA_STRIDE_1[world_size]}.items():
        # NOTE: the worker's own default is ulysses: the steps say which algorithm to run
        worker = _worker(model_dir, groups)
        for num_slices, chunk in CHUNKS[world_size].items():
            config = SchedulerConfig(policy="sps2", long_prompt_threshold=32,
                                     max_num_batched_tokens=32, lockstep=False,
                                     sp_prefill_chunk=chunk)
            scheduler = Scheduler(config, DistributedKVCacheManager(world_size, NUM_BLOCKS,
                                                                    BLOCK), 256,
                                  num_instances=world_size,
                                  sp_attention=SpAttention.parse(algorithm, levels))
            worker.first_logits.clear()
            results[(algorithm, num_slices)] = _serve_steps(worker, scheduler, prompts, groups)
    return results


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    worker = _worker(tiny_model_dir)
    requests = _requests(_prompts(read_arch_config(tiny_model_dir).vocab_size))
    scheduler = Scheduler(SchedulerConfig(policy="sarathi", max_num_batched_tokens=32),
                          KVCacheManager(NUM_BLOCKS, BLOCK), 256)
    for request in requests:
        scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        scheduler.update_from_output(output, worker.execute_model(output))
    return worker.first_logits["r1"], [r.output_token_ids for r in requests]


@pytest.mark.parametrize("sp_size", [2, 4])
def test_chunked_sp_prefill_matches_one_worker(tiny_model_dir, reference, sp_size):
    logits, tokens = reference
    results = run_distributed(_chunked_rank, sp_size, tiny_model_dir, timeout_s=400)
    for (algorithm, num_slices), got in results[0].items():
        assert got["slices"] == num_slices, (algorithm, num_slices)
        assert got["hybrid"] == num_slices  # the short request decodes in every slice's step
        for result in results:
            assert result[(algorithm, num_slices)]["tokens"] == tokens, (algorithm, num_slices)
        sampled = [r[(algorithm, num_slices)]["logits"] for r in results
                   if r[(algorithm, num_slices)]["logits"] is not None]
        assert len(sampled) == 1  # the rank holding the prompt's last token
        torch.testing.assert_close(sampled[0], logits, atol=LOGIT_TOL, rtol=LOGIT_TOL,
                                   msg=lambda m, a=algorithm, s=num_slices: f"{a}/{s}: {m}")
    assert len(tokens[1]) == MAX_TOKENS
