"""Which instances a loongserve plan may use on per-instance steps: a contiguous window, grown
from idle instances into decode instances one neighbour at a time (LoongServe's elastic
instance allocation, algorithms.md §3). No torch.

Process groups exist for contiguous parts of the SP group (parallel/groups.py), so every ESP
group, and hence the window the batching DP splits into groups, is a run of consecutive
instances. The window starts from the longest run of idle instances (no request bound to
them; ties: most free KV, lowest rank) and extends into the neighbouring decode instances,
cheaper to pause first (the sum of 1/len of the decodes bound to it, then more free KV).
Instances bound to a prefill in progress are never in a window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from csps.scheduler.loongserve_admission import sorted_by_length
from csps.scheduler.loongserve_batching import plan_prefill

if TYPE_CHECKING:
    from csps.request import Request
    from csps.scheduler.books import SchedulerBooks


def contiguous_runs(ranks: Iterable[int]) -> list[tuple[int, ...]]:
    """Maximal runs of consecutive ranks, in rank order."""
    runs: list[list[int]] = []
    for rank in sorted(set(ranks)):
        if runs and runs[-1][-1] == rank - 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return [tuple(run) for run in runs]


@dataclass(frozen=True)
class InstanceWindow:
    """base: the idle run the plan starts from (may be empty); order: base, then the decode
    instances in the order they may be borrowed, so that the first j of `order` are always
    consecutive instances."""

    base: tuple[int, ...]
    order: tuple[int, ...]

    def first(self, j: int) -> tuple[int, ...]:
        """The window of the first j instances of the order, in rank order."""
        return tuple(sorted(self.order[:j]))


def choose_window(candidates: Iterable[int], idle: Iterable[int],
                  pause_cost: Callable[[int], float],
                  free_blocks: Callable[[int], int]) -> InstanceWindow | None:
    """The window over `candidates` (instances no prefill holds); None when there are none.
    idle: the candidates no request is bound to; pause_cost(i): what pausing instance i's
    decodes costs; free_blocks(i): its free KV blocks."""
    candidates, idle = set(candidates), set(idle)
    if not candidates:
        return None
    idle_runs = contiguous_runs(idle & candidates)
    if idle_runs:
        base = max(idle_runs, key=lambda run: (len(run), sum(map(free_blocks, run)), -run[0]))
        seed = list(base)
    else:
        base = ()
        seed = [min(candidates, key=lambda i: (pause_cost(i), -free_blocks(i), i))]
    (run,) = [r for r in contiguous_runs(candidates) if seed[0] in r]
    order, lo, hi = list(seed), min(seed), max(seed)
    while lo > run[0] or hi < run[-1]:
        sides = [i for i in (lo - 1, hi + 1) if run[0] <= i <= run[-1]]
        pick = min(sides, key=lambda i: (pause_cost(i), -free_blocks(i), i))
        order.append(pick)
        lo, hi = min(lo, pick), max(hi, pick)
    return InstanceWindow(tuple(base), tuple(order))


class WindowPlans:
    """plans[j]: the DP's best plan on the first j instances of the window's order, computed
    when asked (the admission and borrowing tests read two or three of them). policy: the
    loongserve policy (its need(), fits and max_sp_batch)."""

    def __init__(self, policy, scheduler: SchedulerBooks,
                 requests: list[Request], window: InstanceWindow) -> None:
        self._args = policy, scheduler, sorted_by_length(requests)
        self._window, self._memo = window, {}

    def __len__(self) -> int:
        return len(self._window.order) + 1

    def __getitem__(self, j: int):
        j = j + len(self) if j < 0 else j
        if j not in self._memo:
            policy, scheduler, ordered = self._args
            pools = scheduler.kv_cache_manager.pools
            block = scheduler.kv_cache_manager.block_size
            plans = plan_prefill([r.num_tokens for r in ordered],
                                 [policy.need(scheduler, r) for r in ordered],
                                 self._window.first(j),
                                 lambda rank: pools[rank].num_free_blocks * block, policy.fits,
                                 policy.max_sp_batch, scheduler.token_budget)
            self._memo[j] = plans[-1]
        return self._memo[j]
