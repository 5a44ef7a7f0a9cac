"""Moving a request's KV onto one SP rank (csps/kvcache/kv_moves.py): the books before, while
and after the copy, and the bad cases that change nothing. No torch."""

import pytest

from csps.contract.step import KvMove
from csps.contract.token_range import TokenRange
from csps.kvcache.placement import DistributedKVCacheManager


def spread(manager, request_id="a", lens=(32, 32, 32, 20), ranks=(0, 1, 2, 3)):
    assert manager.allocate_prefill(request_id, list(lens), list(ranks)) is not None
    return manager.placement(request_id)


def test_plan_then_apply_moves_everything_onto_the_target():
    manager = DistributedKVCacheManager(4, 20, 16)
    before = spread(manager)
    moves = manager.plan_moves("a", 3)
    assert [(m.src.rank, m.dst.rank, m.src.start, m.src.end) for m in moves] == [
        (0, 3, 0, 32), (1, 3, 32, 64), (2, 3, 64, 96)]
    # while the step copies: source and destination blocks are both held
    assert [p.num_used_blocks for p in manager.pools] == [2, 2, 2, 2 + 6]
    assert manager.placement("a") == before
    manager.check_invariants()
    manager.apply_moves("a")
    after = manager.placement("a")
    assert after.ranks == [3] and after.num_tokens == 116
    assert [p.num_used_blocks for p in manager.pools] == [0, 0, 0, 8]
    # the copies of whole-block ranges and the rank's own tail join into one block table
    assert [(r.start, r.end, len(r.block_ids)) for r in after.ranges] == [(0, 116, 8)]
    assert after.ranges[0].block_ids[6:] == before.ranges[3].block_ids
    assert manager.group("a") == (3,)
    manager.check_invariants()
    # decode KV now grows on the target
    assert manager.allocate_slots("a", 140)
    assert manager.placement("a").ranks == [3]
    manager.check_invariants()


def test_a_request_freed_while_its_moves_run_returns_every_block():
    manager = DistributedKVCacheManager(4, 20, 16)
    spread(manager)
    assert manager.plan_moves("a", 0)
    manager.free("a")
    assert manager.num_free_blocks == 4 * 20
    manager.apply_moves("a")  # the step ends after the abort: nothing left to point at
    assert manager.placement("a") is None
    manager.check_invariants()


def test_no_move_when_the_target_is_short_or_the_blocks_are_shared():
    manager = DistributedKVCacheManager(4, 8, 16)
    spread(manager)
    other = spread(manager, "b", lens=(16, 16, 16, 16))
    assert other is not None
    assert manager.plan_moves("a", 3) is None  # rank 3 has 8 - 2 - 1 = 5 free, needs 6
    assert [p.num_used_blocks for p in manager.pools] == [3, 3, 3, 3]
    assert manager.blocks_to_move("a", 3) == 6
    manager.pools[1].touch(manager.placement("a").ranges[1].block_ids)  # shared, as a prefix
    assert manager.blocks_to_move("a", 0) == -1 and manager.plan_moves("a", 0) is None
    assert manager.plan_moves("a", 9) is None


def test_moves_are_planned_once_and_a_request_already_there_needs_none():
    manager = DistributedKVCacheManager(2, 20, 16)
    spread(manager, lens=(40,), ranks=(1,))
    assert manager.plan_moves("a", 1) == []
    spread(manager, "b", lens=(32, 8), ranks=(0, 1))
    assert len(manager.plan_moves("b", 1)) == 1
    assert manager.plan_moves("b", 1) is None  # pending already


def test_kv_move_checks_its_ranges():
    src = TokenRange(0, 0, 32, (1, 2))
    with pytest.raises(ValueError, match="copies one range"):
        KvMove("a", src, TokenRange(0, 0, 32, (3, 4)))  # same rank
    with pytest.raises(ValueError, match="copies one range"):
        KvMove("a", src, TokenRange(1, 0, 16, (3,)))  # other positions
    assert KvMove("a", src, TokenRange(1, 0, 32, (5, 6))).dst.rank == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"consolidate_decode_kv": 0.5}, "factor >= 1"),
    ({"consolidate_decode_kv": 2.0, "lockstep": True}, "lockstep")])
def test_bad_consolidation_settings_are_refused(kwargs, message):
    from csps.config import SchedulerConfig

    with pytest.raises(ValueError, match=message):
        SchedulerConfig(policy="sps2", **kwargs)
