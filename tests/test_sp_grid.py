"""SP x TP workers end to end on a small random Llama (GQA, uneven chunks), real gloo groups.

Every rank builds a real Worker from its ParallelGroups and runs the engine's loop: the same
sps2 Scheduler on every rank decides, each Worker runs its share, the ranks' RunnerOutputs are
merged as the executor merges them. Checked against one single-process Worker:
- first-token logits of an SP prefill within 1e-4 (fp32; sums in another order), for
  P x T in {2, 3, 4} x {1, 2} and every SP algorithm (CSA with every stride 1);
- 32 greedy decode steps identical, with decode KV spread over ranks in 4-token blocks (the
  new token's K/V is often stored on a rank other than the leader), with q-move and kv-move.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_distributed

from csps.attention.metadata import AttentionMetadata
from csps.config import SchedulerConfig
from csps.engine.worker import Worker
from csps.kvcache.kv_cache_manager import KVCacheManager
from csps.kvcache.placement import DistributedKVCacheManager, split_prompt
from csps.model.loader import read_arch_config
from csps.parallel.groups import init_parallel_groups
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

pytestmark = pytest.mark.slow

BLOCK = 4
NUM_BLOCKS = 96  # per rank
MAX_TOKENS = 33  # the first token from prefill, then 32 decode steps
PROMPT_LENS = (70, 37, 9)  # two SP prefills (threshold 32) and one local prompt
LOGIT_TOL = 1e-4
GRID = [(2, 1), (4, 1), (2, 2), (3, 2), (4, 2)]


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _worker(model_dir, groups=None, sp_attention="ulysses", sp_decode="qmove",
            csa_levels="1:1,2:2") -> Worker:
    return Worker(model_dir, read_arch_config(model_dir), "float32", "cpu", NUM_BLOCKS, BLOCK,
                  seed=0, groups=groups, sp_attention=sp_attention, sp_decode=sp_decode,
                  csa_levels=csa_levels)


def _prefill_logits(worker: Worker, tokens: list[int], sp_rank: int, sp_size: int):
    """Last-token logits of a whole-prompt SP prefill (None on ranks without the last token)."""
    chunk_lens = split_prompt(len(tokens), sp_size, BLOCK)
    start = sum(chunk_lens[:sp_rank])
    end = start + chunk_lens[sp_rank]
    md = AttentionMetadata.build_sp_prefill(chunk_lens, sp_rank, "cpu")
    with torch.inference_mode():
        hidden = worker.model(torch.tensor(tokens[start:end]), torch.arange(start, end), None, md)
        return worker.model.compute_logits(hidden[-1:])[0] if sp_rank == sp_size - 1 else None


def _serve(worker: Worker, scheduler: Scheduler, prompts: list[list[int]],
           cpu_group=None) -> list[list[int]]:
    """The engine loop: schedule, execute on every rank, merge, update. Greedy outputs."""
    requests = [Request(f"r{i}", p, SamplingParams(temperature=0, ignore_eos=True),
                        max_tokens=MAX_TOKENS) for i, p in enumerate(prompts)]
    for request in requests:
        scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        runner_output = worker.execute_model(output)
        if cpu_group is not None:
            outputs = [None] * dist.get_world_size(cpu_group)
            dist.all_gather_object(outputs, runner_output, group=cpu_group)
            runner_output = RunnerOutput.merge(outputs)
        scheduler.update_from_output(output, runner_output)
        scheduler.check_invariants()
    return [r.output_token_ids for r in requests]


def _grid_rank(rank: int, world_size: int, model_dir, sp_size: int, tp_size: int) -> dict:
    groups = init_parallel_groups(sp_size, tp_size, backend="gloo")
    prompts = _prompts(read_arch_config(model_dir).vocab_size)
    result = {"logits": {}}
    for algorithm in ("ulysses", "allgather_kv", "ring", "csa"):  # CSA at stride 1: exact
        worker = _worker(model_dir, groups, algorithm, csa_levels=f"1:1,{sp_size}:1")
        result["logits"][algorithm] = _prefill_logits(worker, prompts[0], groups.sp_rank,
                                                      sp_size)
    config = SchedulerConfig(policy="sps2", long_prompt_threshold=32, max_num_batched_tokens=32)
    for sp_decode in ("qmove", "kvmove"):
        worker = _worker(model_dir, groups, sp_decode=sp_decode)
        scheduler = Scheduler(config, DistributedKVCacheManager(sp_size, NUM_BLOCKS, BLOCK), 256)
        result[sp_decode] = _serve(worker, scheduler, prompts, groups.cpu_group)
        result[sp_decode + "_bytes"] = dict(worker.comm_stats.bytes_sent)
    result["spread"] = [len(scheduler.kv_cache_manager.pools[r].used_block_ids())
                        for r in range(sp_size)]
    return result


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    worker = _worker(tiny_model_dir)
    prompts = _prompts(read_arch_config(tiny_model_dir).vocab_size)
    logits = _prefill_logits(worker, prompts[0], 0, 1)
    scheduler = Scheduler(SchedulerConfig(policy="sarathi", max_num_batched_tokens=32),
                          KVCacheManager(NUM_BLOCKS, BLOCK), 256)
    return logits, _serve(worker, scheduler, prompts)


@pytest.mark.parametrize("sp_size,tp_size", GRID)
def test_sp_tp_workers_match_one_worker(tiny_model_dir, reference, sp_size, tp_size):
    logits, tokens = reference
    results = run_distributed(_grid_rank, sp_size * tp_size, tiny_model_dir, sp_size, tp_size,
                              timeout_s=300)
    last_ranks = [r for r in results if r["logits"]["ulysses"] is not None]
    assert len(last_ranks) == tp_size  # the last SP rank of each TP column
    for result in last_ranks:
        for algorithm, got in result["logits"].items():
            torch.testing.assert_close(got, logits, atol=LOGIT_TOL, rtol=LOGIT_TOL,
                                       msg=lambda m, a=algorithm: f"{a}: {m}")
    for result in results:
        assert result["qmove"] == tokens and result["kvmove"] == tokens
        assert len(tokens[0]) == MAX_TOKENS
        sent = result["qmove_bytes"]
        assert sent["decode_attn"] > 0 and sent["prefill_attn"] > 0
        assert (sent["tp"] > 0) == (tp_size > 1)
    # moving the KV (up to ~140 tokens of context here) costs more than moving the query
    assert (sum(r["kvmove_bytes"]["decode_attn"] for r in results)
            > sum(r["qmove_bytes"]["decode_attn"] for r in results))
