"""Per-request SP prefill plans on real workers (gloo, tiny random Llama, fp32).

- Scale-down (LoongServe): the prompt computed over P ranks with ring attention, its KV kept
  on fewer ranks than computed it (ScheduledRequest.kv_ranges differ from sp_chunk_lens).
  The keeping ranks' caches must hold exactly the K/V one process computes for those
  positions, and the first token must match.
- Per-request algorithm / CSA levels overriding the worker's: same first token as dense
  (CSA at stride 1 is dense).
- A migration plan with an algorithm that does not pass every chunk (Ulysses) is refused on
  every rank, before any collective (no hang).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gloo_harness import run_distributed

from csps.contract.sp_attention import SpAttention
from csps.contract.step import ScheduledRequest, SchedulerOutput
from csps.engine.worker import Worker
from csps.kvcache.placement import TokenRange, split_prompt
from csps.model.loader import read_arch_config
from csps.parallel.groups import init_parallel_groups
from csps.request import SamplingParams

pytestmark = pytest.mark.slow

BLOCK = 4
NUM_BLOCKS = 64
PROMPT_LEN = 58  # chunks of 16/16/12/... on P ranks: uneven, a partial last block


def _prompt(vocab_size: int) -> list[int]:
    return torch.randint(3, vocab_size, (PROMPT_LEN,),
                         generator=torch.Generator().manual_seed(1)).tolist()


def _worker(model_dir, groups=None, sp_attention="ring") -> Worker:
    return Worker(model_dir, read_arch_config(model_dir), "float32", "cpu", NUM_BLOCKS, BLOCK,
                  seed=0, groups=groups, sp_attention=sp_attention)


def _request(tokens, chunk_lens, kv_ranges, leader, **overrides) -> ScheduledRequest:
    request = ScheduledRequest("r0", tokens, 0, [], SamplingParams(temperature=0), True,
                               kv_ranges=tuple(kv_ranges), leader=leader,
                               sp_chunk_lens=tuple(chunk_lens))
    for name, value in overrides.items():  # fields the scheduler may not define yet
        object.__setattr__(request, name, value)
    return request


def _held_kv(worker: Worker, ranges, rank: int) -> dict[int, torch.Tensor]:
    """position -> K and V of every layer, concatenated, for positions this rank holds."""
    out = {}
    for held in (r for r in ranges if r.rank == rank):
        for pos in range(held.start, held.end):
            offset = pos - held.start
            block, slot = held.block_ids[offset // BLOCK], offset % BLOCK
            out[pos] = torch.cat([torch.cat([c.k_cache[block, slot], c.v_cache[block, slot]])
                                  for c in worker.runner.kv_caches])
    return out


def _scale_down_ranges(sp_size: int) -> list[TokenRange]:
    """Everything on the last rank when P = 2; on the last two ranks (split unevenly) else."""
    if sp_size == 2:
        return [TokenRange(1, 0, PROMPT_LEN, tuple(range(40, 55)))]
    cut = 22  # not a chunk boundary
    return [TokenRange(sp_size - 2, 0, cut, tuple(range(30, 36))),
            TokenRange(sp_size - 1, cut, PROMPT_LEN, tuple(range(10, 19)))]


def _rank(rank: int, world: int, model_dir) -> dict:
    groups = init_parallel_groups(world, 1, backend="gloo")
    tokens = _prompt(read_arch_config(model_dir).vocab_size)
    chunk_lens = split_prompt(PROMPT_LEN, world, BLOCK)
    ranges = _scale_down_ranges(world)
    result = {}
    worker = _worker(model_dir, groups, "ring")
    out = worker.execute_model(SchedulerOutput(1, [_request(tokens, chunk_lens, ranges,
                                                            world - 1)]))
    result["token"] = out.sampled_token_ids.get("r0")
    result["kv"] = _held_kv(worker, ranges, rank)
    start = sum(chunk_lens[:rank])
    own = [TokenRange(r, sum(chunk_lens[:r]), sum(chunk_lens[:r + 1]),
                      tuple(range(r * 16, r * 16 + 16))) for r in range(world)]
    for name, overrides in {"ring override": {"sp_attention": SpAttention("ring")},
                            "csa stride 1": {"sp_attention": SpAttention.parse(
                                "csa", f"1:1,{world}:1")}}.items():
        worker = _worker(model_dir, groups, "ulysses")
        out = worker.execute_model(SchedulerOutput(1, [_request(tokens, chunk_lens, own,
                                                                world - 1, **overrides)]))
        result[name] = out.sampled_token_ids.get("r0")
    worker = _worker(model_dir, groups, "ulysses")
    try:
        worker.execute_model(SchedulerOutput(1, [_request(tokens, chunk_lens, ranges,
                                                          world - 1)]))
        result["refused"] = None
    except ValueError as exc:
        result["refused"] = str(exc)
    result["start"] = start
    return result


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """One process: the first token and every position's K/V."""
    worker = _worker(tiny_model_dir, None, "reference")
    tokens = _prompt(read_arch_config(tiny_model_dir).vocab_size)
    blocks = tuple(range(15))
    request = ScheduledRequest("r0", tokens, 0, list(blocks), SamplingParams(temperature=0),
                               True)
    token = worker.execute_model(SchedulerOutput(1, [request])).sampled_token_ids["r0"]
    kv = _held_kv(worker, [TokenRange(0, 0, PROMPT_LEN, blocks)], 0)
    return token, kv


@pytest.mark.parametrize("sp_size", [2, 3, 4])
def test_scale_down_and_per_request_algorithm(tiny_model_dir, reference, sp_size):
    token, kv = reference
    results = run_distributed(_rank, sp_size, tiny_model_dir, timeout_s=120)
    assert results[-1]["token"] == token
    kept = {}
    for result in results:
        kept.update(result["kv"])
    ranges = _scale_down_ranges(sp_size)
    assert sorted(kept) == list(range(PROMPT_LEN))  # every position kept, once
    for rank, result in enumerate(results):
        assert (len(result["kv"]) > 0) == any(r.rank == rank for r in ranges)
    for pos, got in kept.items():
        torch.testing.assert_close(got, kv[pos], atol=1e-5, rtol=1e-5)
    assert results[-1]["ring override"] == token and results[-1]["csa stride 1"] == token
    for result in results:  # refused everywhere, so no rank waits in a collective
        assert result["refused"] is not None and "ring" in result["refused"]


def test_plan_is_none_without_choices():
    from csps.attention.sp_prefill_plan import SpPrefillPlan
    own = [TokenRange(0, 0, 8, (0, 1)), TokenRange(1, 8, 12, (3,))]
    assert SpPrefillPlan.for_request([8, 4], own, 0, BLOCK, "cpu", None) is None
    moved = [dataclasses.replace(own[0], rank=1, block_ids=(5, 6)), own[1]]
    plan = SpPrefillPlan.for_request([8, 4], moved, 0, BLOCK, "cpu", None)
    assert plan.migrates and plan.kv_keep == {}  # rank 0 computes but keeps nothing
    plan = SpPrefillPlan.for_request([8, 4], moved, 1, BLOCK, "cpu", None)
    rows, slots = plan.kv_keep[0]
    assert rows.tolist() == list(range(8)) and slots.tolist() == list(range(20, 28))
    assert plan.kv_keep[1][1].tolist() == [12, 13, 14, 15]
