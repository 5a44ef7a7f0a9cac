"""Scheduler-side KV placement over an SP group (csps/kvcache/placement.py). No torch."""

import random
import subprocess
import sys

import pytest

from csps.kvcache.placement import (
    DistributedKVCacheManager,
    RequestPlacement,
    TokenRange,
    split_prompt,
)


@pytest.mark.parametrize("num_tokens, sp_size, block_size, expected", [
    (64, 4, 16, [16, 16, 16, 16]),     # even, aligned
    (64, 2, 16, [32, 32]),
    (48, 2, 16, [16, 32]),             # 3 blocks over 2 ranks: the extra block goes last
    (70, 4, 16, [16, 16, 16, 22]),     # 5 blocks, the last one partial
    (100, 3, 16, [32, 32, 36]),        # 7 blocks: [2, 2, 3], last partial
    (17, 2, 16, [16, 1]),              # aligned even if very uneven
    (7, 2, 16, [4, 3]),                # fewer blocks than ranks: plain even split
    (10, 4, 4, [3, 3, 2, 2]),          # 3 blocks < 4 ranks
    (4, 4, 16, [1, 1, 1, 1]),          # tiny: one token each
    (2, 4, 16, [1, 1, 0, 0]),          # fewer tokens than ranks
    (0, 3, 16, [0, 0, 0]),
    (5, 1, 16, [5]),
])
def test_split_prompt(num_tokens, sp_size, block_size, expected):
    lens = split_prompt(num_tokens, sp_size, block_size)
    assert lens == expected and sum(lens) == num_tokens


def test_split_prompt_properties():
    for n in range(0, 200):
        for p in (1, 2, 3, 4, 8):
            lens = split_prompt(n, p, 8)
            assert sum(lens) == n and len(lens) == p
            if n >= p:
                assert min(lens) >= 1
            if -(-n // 8) >= p:  # enough blocks: every boundary aligned, within one block
                assert all(x % 8 == 0 for x in lens[:-1]) and max(lens) - min(lens) <= 8
    with pytest.raises(ValueError):
        split_prompt(10, 0, 16)


def test_records_validate_and_answer():
    with pytest.raises(ValueError):
        TokenRange(0, 5, 3, ())
    with pytest.raises(ValueError):
        RequestPlacement("r", [TokenRange(0, 0, 4, (0,)), TokenRange(1, 5, 8, (0,))])
    p = RequestPlacement("r", [TokenRange(0, 0, 4, (0,)), TokenRange(1, 4, 9, (0, 1)),
                               TokenRange(0, 9, 10, (1,))])
    assert p.num_tokens == 10 and p.ranks == [0, 1]
    assert p.range_of(0).rank == 0 and p.range_of(4).rank == 1 and p.range_of(9).start == 9
    assert p.tokens_on(0) == 5 and p.tokens_on(1) == 5 and p.tokens_on(2) == 0
    with pytest.raises(ValueError):
        p.range_of(10)


def test_allocate_prefill_and_slot_mapping():
    m = DistributedKVCacheManager(num_ranks=2, num_blocks_per_rank=4, block_size=4)
    p = m.allocate_prefill("a", [8, 6], [0, 1])
    assert [(r.rank, r.start, r.end, len(r.block_ids)) for r in p.ranges] == [
        (0, 0, 8, 2), (1, 8, 14, 2)]
    b = p.ranges[1].block_ids
    assert m.slot_mapping("a", 8, 14, 1) == [b[0] * 4 + i for i in range(4)] + [b[1] * 4,
                                                                                 b[1] * 4 + 1]
    with pytest.raises(ValueError):
        m.slot_mapping("a", 7, 9, 1)  # position 7 lives on rank 0
    with pytest.raises(ValueError):
        m.slot_mapping("a", 12, 15, 1)  # past the end
    assert m.usage_per_rank() == [0.5, 0.5] and m.total_free_tokens() == 16
    m.check_invariants()


def test_allocate_prefill_is_all_or_nothing():
    m = DistributedKVCacheManager(num_ranks=3, num_blocks_per_rank=2, block_size=4)
    m.allocate_prefill("a", [4], [2])
    assert not m.can_admit([8, 8, 8], [0, 1, 2])
    assert m.allocate_prefill("b", [8, 8, 8], [0, 1, 2]) is None
    assert m.usage_per_rank() == [0.0, 0.0, 0.5] and m.placement("b") is None
    assert m.allocate_prefill("b", [8, 8, 4], [0, 1, 2]) is not None
    m.check_invariants()
    with pytest.raises(ValueError):
        m.allocate_prefill("c", [1, 1], [0, 0])  # a rank twice


def test_append_least_loaded_with_ties_and_block_room():
    m = DistributedKVCacheManager(num_ranks=4, num_blocks_per_rank=8, block_size=4)
    m.allocate_prefill("a", [4, 4, 4], [1, 2, 3])      # ranks 1-3 one block each, 0 outside
    m.allocate_prefill("b", [8, 4], [2, 3])            # rank 2: 3 blocks, rank 3: 2
    r = m.append_slots("a", 1)                          # rank 1 holds fewest blocks (1)
    assert (r.rank, r.start, r.end) == (1, 12, 13)
    for _ in range(3):                                   # the block on rank 1 has room: stay
        assert m.append_slots("a", 1).rank == 1
    assert m.placement("a").tokens_on(1) == 8
    # now ranks 1, 2, 3 hold 2, 3, 2 blocks: tie between 1 and 3 goes to the lower rank
    r = m.append_slots("a", 1)
    assert (r.rank, r.start, r.end, len(r.block_ids)) == (1, 12, 17, 2)  # the range grows
    assert len(m.placement("a").ranges) == 4
    m.check_invariants()


def test_append_fills_last_prefill_block_first_and_spans_blocks():
    m = DistributedKVCacheManager(num_ranks=2, num_blocks_per_rank=8, block_size=4)
    m.allocate_prefill("a", [4, 2], [0, 1])
    r = m.append_slots("a", 2)                          # room in rank 1's block
    assert (r.rank, r.start, r.end, len(r.block_ids)) == (1, 4, 8, 1)
    r = m.append_slots("a", 9)                          # tie 1 vs 1 block -> rank 0, 3 blocks
    assert (r.rank, r.start, r.end, len(r.block_ids)) == (0, 8, 17, 3)
    assert m.placement("a").num_tokens == 17
    assert m.append_slots("a", 100) is None and m.placement("a").num_tokens == 17
    m.check_invariants()


def test_free_returns_everything():
    m = DistributedKVCacheManager(num_ranks=2, num_blocks_per_rank=4, block_size=4)
    m.allocate_prefill("a", [8, 5], [0, 1])
    m.append_slots("a", 7)
    m.free("a")
    m.free("a")  # unknown: no-op
    assert m.usage_per_rank() == [0.0, 0.0] and m.total_free_tokens() == 32
    m.check_invariants()


def test_request_larger_than_one_rank_is_placed_across_the_group():
    m = DistributedKVCacheManager(num_ranks=4, num_blocks_per_rank=4, block_size=4)
    assert m.allocate_prefill("solo", [40], [0]) is None       # 10 blocks > one pool of 4
    lens = split_prompt(40, 4, 4)
    p = m.allocate_prefill("big", lens, [0, 1, 2, 3])
    assert p is not None and p.num_tokens == 40 and p.ranks == [0, 1, 2, 3]
    assert m.total_free_tokens([0, 1, 2, 3]) == 64 - 40
    m.check_invariants()


def test_randomized_allocate_append_free_keeps_invariants():
    rng = random.Random(0)
    m = DistributedKVCacheManager(num_ranks=4, num_blocks_per_rank=12, block_size=4)
    live, lengths = [], {}
    for step in range(2000):
        op = rng.random()
        if op < 0.3:
            sp = rng.randint(1, 4)
            ranks = sorted(rng.sample(range(4), sp))
            n = rng.randint(0, 60)
            lens = split_prompt(n, sp, 4)
            ok = m.can_admit(lens, ranks)
            p = m.allocate_prefill(f"r{step}", lens, ranks)
            assert (p is not None) == ok
            if p is not None:
                live.append(f"r{step}")
                lengths[f"r{step}"] = n
        elif op < 0.8 and live:
            rid = rng.choice(live)
            k = rng.choice([1, 1, 1, 3, 9])
            if m.append_slots(rid, k) is not None:
                lengths[rid] += k
        elif live:
            m.free(live.pop(rng.randrange(len(live))))
        m.check_invariants()
        slots = {r: set() for r in range(4)}
        for rid in live:
            assert m.placement(rid).num_tokens == lengths[rid]
            for r in m.placement(rid).ranges:  # every live slot is distinct within its rank
                new = m.slot_mapping(rid, r.start, r.end, r.rank)
                assert len(set(new)) == r.num_tokens and not slots[r.rank] & set(new)
                slots[r.rank].update(new)
    for rid in live:
        m.free(rid)
    m.check_invariants()
    assert m.usage_per_rank() == [0.0] * 4


def test_placement_imports_without_torch():
    code = ("import sys, csps.kvcache.placement\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sticky_append_stays_until_its_rank_is_full_then_scales_up():
    manager = DistributedKVCacheManager(num_ranks=2, num_blocks_per_rank=4, block_size=4)
    manager.allocate_prefill("busy", [8], [1])  # rank 1: 2 of 4 blocks used
    manager.allocate_prefill("r", [4, 0], [1, 0], sticky=True)  # on rank 1, may spill to 0
    for _ in range(4):  # rank 1's last free block: stays although rank 0 is emptier
        assert manager.append_slots("r", 1).rank == 1
    assert [r.rank for r in manager.placement("r").ranges] == [1]
    assert manager.append_slots("r", 1).rank == 0  # rank 1 full: scale up onto rank 0
    assert [(r.rank, r.start, r.end) for r in manager.placement("r").ranges] == [(1, 0, 8),
                                                                                  (0, 8, 9)]
    manager.free("r")
    manager.check_invariants()
    assert manager.pools[0].num_free_blocks == 4 and manager.pools[1].num_free_blocks == 2
