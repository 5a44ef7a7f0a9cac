"""KV moves on real gloo workers (csps/parallel/kv_transfer.py): 3 ranks, two of them sending
blocks of every layer into the third's cache, one rank in neither role; the copies are exact
and nothing else in any cache changes; bytes are counted under kv_transfer."""

from __future__ import annotations

import pytest
import torch
from gloo_harness import run_distributed

from csps.contract.step import KvMove
from csps.contract.token_range import TokenRange
from csps.kvcache.paged_cache import KVCache
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import init_parallel_groups

pytestmark = pytest.mark.slow

LAYERS, BLOCKS, BS, HEADS, DIM = 2, 6, 4, 2, 3
MOVES = [KvMove("a", TokenRange(0, 0, 8, (1, 4)), TokenRange(2, 0, 8, (0, 5))),
         KvMove("a", TokenRange(1, 8, 11, (2,)), TokenRange(2, 8, 11, (3,))),
         KvMove("b", TokenRange(0, 0, 4, (0,)), TokenRange(1, 0, 4, (5,)))]


def _caches(rank: int) -> list[KVCache]:
    """Distinct values per rank, layer, K/V and block: [BLOCKS, BS, HEADS, DIM]."""
    shape = (BLOCKS, BS, HEADS, DIM)
    n = BLOCKS * BS * HEADS * DIM
    return [KVCache(torch.arange(n, dtype=torch.float32).view(shape) + 1e4 * rank + 1e3 * layer,
                    -torch.arange(n, dtype=torch.float32).view(shape) - 1e4 * rank - 1e3 * layer)
            for layer in range(LAYERS)]


def _move_worker(rank: int, world_size: int) -> tuple[list, dict]:
    from csps.parallel.kv_transfer import move_kv_blocks

    groups = init_parallel_groups(sp_size=world_size, tp_size=1, backend="gloo")
    stats = CommStats()
    caches = _caches(rank)
    move_kv_blocks(Communicator(groups.sp_group, stats, "kv_transfer"), caches, MOVES)
    return [(c.k_cache, c.v_cache) for c in caches], dict(stats.bytes_sent)


def test_moves_copy_whole_blocks_of_every_layer_exactly():
    results = run_distributed(_move_worker, 3)
    before = [_caches(rank) for rank in range(3)]
    expected = [[(c.k_cache.clone(), c.v_cache.clone()) for c in caches] for caches in before]
    for move in MOVES:
        for layer in range(LAYERS):
            for src, dst in zip(move.src.block_ids, move.dst.block_ids, strict=True):
                for kv in (0, 1):
                    expected[move.dst.rank][layer][kv][dst] = \
                        expected[move.src.rank][layer][kv][src]
    for rank, (caches, _) in enumerate(results):
        for layer in range(LAYERS):
            for kv in (0, 1):
                assert torch.equal(caches[layer][kv], expected[rank][layer][kv]), (rank, layer)
    block_bytes = 2 * BS * HEADS * DIM * 4 * LAYERS  # K and V of one block, every layer
    assert [r[1]["kv_transfer"] for r in results] == [3 * block_bytes, block_bytes, 0]
