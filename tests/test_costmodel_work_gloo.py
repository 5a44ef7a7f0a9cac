"""iteration_work's bytes and collective counts EQUAL what CommStats counts in real gloo runs.

Real spawned SP (x TP) workers on a tiny random 9/3-head Llama run the sps2 engine loop: one SP
prefill (uneven head split, every SP algorithm, CSA with both far-query modes and a pipelined
variant), a local chunked prefill, then decode steps whose KV spans the ranks (q-move, one
kv-move case). Every iteration's per-rank, per-phase bytes and collective calls are compared
with the cost model's prediction from the SchedulerOutput alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from conftest import save_tiny_llama
from gloo_harness import run_distributed

from csps.config import ParallelConfig, SchedulerConfig
from csps.costmodel.shape import ModelShape
from csps.costmodel.work import iteration_work
from csps.engine.worker import Worker
from csps.kvcache.placement import DistributedKVCacheManager
from csps.model.loader import read_arch_config
from csps.parallel.groups import init_parallel_groups
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

pytestmark = pytest.mark.slow

BLOCK = 4
NUM_BLOCKS = 64  # per rank
PROMPT_LENS = (101, 9)  # one SP prefill (threshold 32), one local chunked prefill
MAX_TOKENS = 4  # the first token, then 3 decode steps (the long one's KV spans the ranks)
CASES_P2 = [  # (sp_attention, csa_far_queries, csa_micro_batch, sp_decode)
    ("ulysses", "all", "", "qmove"),
    ("allgather_kv", "all", "", "qmove"),
    ("ring", "all", "", "kvmove"),
    ("csa", "all", "", "qmove"),
    ("csa", "sampled", "", "qmove"),
    ("csa", "sampled", "1x8", "qmove"),
]
CASES_P2_TP2 = [("ulysses", "all", "", "qmove"), ("csa", "all", "1x8", "qmove")]
# Chunked SP prefill on per-instance steps (slices of 16 tokens per rank: later slices attend
# to the earlier ones by the prefix exchange, decodes ride in the slices' steps).
CHUNK = 16
CASES_CHUNKED = [("ulysses", "all", "", "qmove"), ("ring", "all", "", "qmove"),
                 ("csa", "all", "", "qmove")]


def _parallel(sp_size: int, tp_size: int, case: tuple) -> ParallelConfig:
    algorithm, far_queries, micro_batch, sp_decode = case
    return ParallelConfig(sequence_parallel_size=sp_size, tensor_parallel_size=tp_size,
                          sp_attention=algorithm, csa_far_queries=far_queries,
                          csa_micro_batch=micro_batch, sp_decode=sp_decode)


def _rank(rank: int, world_size: int, model_dir, sp_size: int, tp_size: int,
          cases: list, chunk: int = 0) -> dict:
    """Per case: every step's SchedulerOutput and this rank's bytes / calls per phase (chunk:
    sps2 on per-instance steps with slices of `chunk` tokens per rank; 0: lock-step)."""
    groups = init_parallel_groups(sp_size, tp_size, backend="gloo")
    arch = read_arch_config(model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, arch.vocab_size, (n,), generator=gen).tolist()
               for n in PROMPT_LENS]
    config = SchedulerConfig(policy="sps2", long_prompt_threshold=32, max_num_batched_tokens=8,
                             lockstep=not chunk, sp_prefill_chunk=chunk)
    result = {"sp_rank": groups.sp_rank, "tp_rank": groups.tp_rank, "cases": []}
    for case in cases:
        parallel = _parallel(sp_size, tp_size, case)
        worker = Worker(model_dir, arch, "float32", "cpu", NUM_BLOCKS, BLOCK, seed=0,
                        groups=groups, sp_attention=parallel.sp_attention,
                        sp_decode=parallel.sp_decode, csa_levels=parallel.resolved_csa_levels,
                        csa_far_queries=parallel.csa_far_queries,
                        csa_micro_batch=parallel.csa_micro_batch)
        scheduler = Scheduler(config, DistributedKVCacheManager(sp_size, NUM_BLOCKS, BLOCK), 256,
                              num_instances=sp_size, sp_attention=parallel.sp_attention_choice)
        for i, prompt in enumerate(prompts):
            scheduler.add_request(Request(f"r{i}", prompt, SamplingParams(
                temperature=0, ignore_eos=True), max_tokens=MAX_TOKENS))
        steps, stats = [], worker.comm_stats
        while scheduler.has_unfinished_requests():
            for step in scheduler.schedule_steps():
                sent, calls = dict(stats.bytes_sent), dict(stats.num_calls)
                runner_output = (worker.execute_step(step) if groups.sp_rank in step.instances
                                 else RunnerOutput())
                steps.append((step.scheduler_output,
                              {p: n - sent[p] for p, n in stats.bytes_sent.items()
                               if n > sent[p]},
                              sum(stats.num_calls.values()) - sum(calls.values())))
                outputs = [None] * dist.get_world_size(groups.cpu_group)
                dist.all_gather_object(outputs, runner_output, group=groups.cpu_group)
                scheduler.update_from_step(step, RunnerOutput.merge(outputs))
        result["cases"].append(steps)
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """9 query / 3 KV heads: uneven head splits over 2 SP ranks and over 2 TP ranks."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_9_3"), num_attention_heads=9,
                           num_key_value_heads=3, hidden_size=9 * 16, head_dim=16)


def _check(results: list[dict], model_dir, sp_size: int, tp_size: int, cases: list) -> None:
    shape = dataclasses.replace(ModelShape.from_config_file(model_dir / "config.json"),
                                dtype_bytes=4)  # fp32 on CPU
    kinds = set()
    for c, case in enumerate(cases):
        parallel = _parallel(sp_size, tp_size, case)
        for result in results:
            for output, measured, calls in result["cases"][c]:
                work = iteration_work(output, shape, parallel, BLOCK,
                                      tp_rank=result["tp_rank"])[result["sp_rank"]]
                label = (f"{case} rank {result['sp_rank']}x{result['tp_rank']} "
                         f"iteration {output.iteration}")
                assert work.comm_bytes == measured, label
                assert work.num_collectives == calls, label
                kinds.update(("sp" if r.is_sp_prefill else "spread" if r.is_distributed
                              else "local") for r in output.scheduled_requests)
    assert kinds == {"sp", "spread", "local"}  # every kind of work was exercised


def test_predicted_bytes_equal_measured_sp2(model_dir):
    results = run_distributed(_rank, 2, model_dir, 2, 1, CASES_P2, timeout_s=180)
    _check(results, model_dir, 2, 1, CASES_P2)
    first = results[0]["cases"][0]
    assert any(m.get("prefill_attn") for _, m, _ in first)  # non-trivial traffic compared
    assert any(m.get("decode_attn") for _, m, _ in first)


def test_predicted_bytes_equal_measured_sp2_tp2(model_dir):
    results = run_distributed(_rank, 4, model_dir, 2, 2, CASES_P2_TP2, timeout_s=180)
    _check(results, model_dir, 2, 2, CASES_P2_TP2)
    assert all(any(m.get("tp") for _, m, _ in r["cases"][0]) for r in results)


def test_predicted_bytes_equal_measured_chunked_sp2(model_dir):
    results = run_distributed(_rank, 2, model_dir, 2, 1, CASES_CHUNKED, CHUNK, timeout_s=180)
    _check(results, model_dir, 2, 1, CASES_CHUNKED)
    later_slices = [output for output, _, _ in results[0]["cases"][0] for r in
                    output.scheduled_requests if r.is_sp_prefill and r.num_computed_tokens]
    assert len(later_slices) >= 2  # the prefix exchange was priced and measured
