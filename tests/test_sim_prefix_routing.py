"""Replica routing in the simulator (simulator/routing.py), and the prefix-cache counts of the
result (simulator/result.py) on stub schedulers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from csps.simulator.result import prefix_cache_counts, prefix_cache_summary
from csps.simulator.routing import Router


def replicas(*loads: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(num_waiting=n, num_running=0) for n in loads]


def test_least_loaded_ignores_hash_ids_and_breaks_ties_by_index():
    router = Router()
    assert router.route((0, 1), replicas(2, 1, 1)) == 1
    assert router.route((0, 1), replicas(0, 3, 0)) == 0


def test_prefix_routing_follows_a_prefix_covering_half_the_ids_else_the_load():
    router = Router("prefix")
    assert router.route((0, 1, 2), replicas(1, 0, 0)) == 1  # nothing seen: least loaded
    assert router.route((0, 5), replicas(0, 1, 0)) == 1  # (0,) on 1: half the ids
    assert router.route((0, 6, 7), replicas(0, 1, 0)) == 0  # (0,) is a third: least loaded
    assert router.route((0, 1, 2, 3), replicas(0, 9, 0)) == 1  # 3 of 4 on 1, however busy
    assert router.route((0, 6, 7, 8), replicas(9, 0, 0)) == 0  # (0, 6, 7) on 0
    assert router.route((), replicas(3, 2, 1)) == 2  # no hash ids: least loaded


def test_a_prefix_on_several_replicas_goes_to_the_least_loaded_of_them():
    router = Router("prefix")
    router.route((0, 1, 2), replicas(0, 1, 1))  # -> 0
    router.route((0, 3, 4), replicas(1, 0, 1))  # (0,) a third: least loaded -> 1
    assert router.route((0, 5), replicas(3, 2, 0)) == 1  # (0,) on 0 and 1: the lighter


def test_unknown_routing_is_refused():
    with pytest.raises(ValueError, match="routing"):
        Router("round-robin")


def test_prefix_cache_counts_sum_over_replicas_and_default_to_zero():
    with_cache = SimpleNamespace(prefix_cache_stats=SimpleNamespace(queries=200, hits=50))
    other = SimpleNamespace(prefix_cache_stats=SimpleNamespace(queries=100, hits=10))
    without = SimpleNamespace()  # a scheduler without a prefix cache
    assert prefix_cache_counts(with_cache) == {
        "prefix_cache_queries": 200, "prefix_cache_hits": 50, "prefix_cache_hit_rate": 0.25}
    assert prefix_cache_counts(without)["prefix_cache_hit_rate"] == 0.0
    total = prefix_cache_summary([with_cache, other, without])
    assert total == {"prefix_cache_queries": 300, "prefix_cache_hits": 60,
                     "prefix_cache_hit_rate": pytest.approx(0.2)}
