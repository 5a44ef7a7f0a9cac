"""PrefixCache.find over several ranks: the cached prefix is tiled by the fewest ranges any
choice of ranks allows (at each start the rank whose cached run reaches farthest), with the
same hit length as any rank-by-rank walk. A block every rank caches (a shared system prompt)
must not split a prefix that one rank holds whole: that split sent short follow-up turns
down the SP path (docs/prefix_caching.md, 'Lookup')."""

from __future__ import annotations

import random

import pytest

from csps.kvcache.block_hash import hash_blocks
from csps.kvcache.block_pool import BlockPool
from csps.kvcache.prefix_cache import PrefixCache
from csps.request import Request, SamplingParams

BLOCK = 4


def _cache(num_ranks: int) -> PrefixCache:
    return PrefixCache([BlockPool(64) for _ in range(num_ranks)], BLOCK)


def _put(cache: PrefixCache, rank: int, tokens: list[int], blocks: range) -> None:
    """Cache blocks `blocks` of `tokens` on `rank` (fresh block ids)."""
    pool, hashes = cache.pools[rank], hash_blocks(tokens, BLOCK)
    for j in blocks:
        (block_id,) = pool.allocate(1)
        pool.cache_block(block_id, hashes[j])
        pool.free([block_id])  # unreferenced, still cached


def _request(tokens: list[int]) -> Request:
    return Request("r", tokens, SamplingParams())


def test_a_block_on_every_rank_does_not_split_a_one_rank_prefix():
    tokens = list(range(100, 121))  # 5 whole blocks and 1 token
    cache = _cache(2)
    _put(cache, 0, tokens, range(1))  # the system prompt on both ranks
    _put(cache, 1, tokens, range(5))  # the conversation's history on rank 1
    prefix = cache.find(_request(tokens), len(tokens))
    assert prefix.num_tokens == 20 and prefix.ranks == (1,)
    assert len(prefix.ranges) == 1


def test_a_prefix_no_rank_holds_whole_is_split_where_runs_end():
    tokens = list(range(200, 229))  # 7 blocks and 1 token
    cache = _cache(3)
    _put(cache, 0, tokens, range(3))
    _put(cache, 1, tokens, range(1, 5))  # reaches farther from block 1 than rank 0
    _put(cache, 2, tokens, range(3, 7))  # reaches farthest from block 3 on
    prefix = cache.find(_request(tokens), len(tokens))
    assert [(r.rank, r.start, r.end) for r in prefix.ranges] == [(0, 0, 12), (2, 12, 28)]


@pytest.mark.parametrize("seed", range(20))
def test_random_placements_hit_every_covered_block_in_fewest_ranges(seed):
    rng = random.Random(seed)
    num_ranks, num_blocks = rng.randint(2, 4), rng.randint(1, 10)
    tokens = [rng.randrange(1000) for _ in range(num_blocks * BLOCK + 1)]
    cache = _cache(num_ranks)
    held = [set() for _ in range(num_ranks)]
    for rank in range(num_ranks):
        start = rng.randrange(num_blocks)
        run = range(start, rng.randint(start, num_blocks))
        _put(cache, rank, tokens, run)
        held[rank] |= set(run)
    prefix = cache.find(_request(tokens), len(tokens))
    covered = 0  # the hit: leading blocks some rank holds
    while covered < num_blocks and any(covered in h for h in held):
        covered += 1
    assert prefix.num_tokens == covered * BLOCK
    fewest, reach, j = 0, 0, 0  # greedy interval cover, computed independently
    while j < covered:
        reach = max(k for h in held if j in h for k in range(j, covered + 1)
                    if all(i in h for i in range(j, k)))
        fewest, j = fewest + 1, reach
    assert len(prefix.ranges) == fewest
    for r in prefix.ranges:  # each range's blocks are its rank's
        assert all(b // BLOCK in held[r.rank] for b in range(r.start, r.end, BLOCK))
