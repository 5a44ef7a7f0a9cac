"""LoongServe's prefill batching (algorithms.md §3): a fitted cost per SP degree and the dynamic
program that splits length-sorted requests over groups of ranks. No torch, no numpy.

The prefill time of a batch of prompt lengths l on m ranks is T_m = A_m + B_m*sum(l) +
C_m*sum(l^2), fitted by least squares (3x3 normal equations) on predictor samples. The DP
serves requests sorted by length, longest first, in batches, each on a group of consecutive
ranks of a given rank order, minimising the sum over requests of TTFT/len, a batch's requests
all getting their first token when it ends: cost(batch) = T_m(batch) * sum(1/l).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillCostFit:
    """T = a + b*sum(l) + c*sum(l^2) seconds for one batch of prompt lengths l."""

    a: float
    b: float
    c: float

    def time(self, sum_len: float, sum_sq: float) -> float:
        return max(0.0, self.a + self.b * sum_len + self.c * sum_sq)

    def batch_time(self, lengths: Sequence[int]) -> float:
        return self.time(sum(lengths), sum(n * n for n in lengths))


def fit_prefill_cost(samples: Sequence[tuple[Sequence[int], float]]) -> PrefillCostFit:
    """Least squares over (batch lengths, seconds) samples; needs 3 independent samples.
    Columns are scaled by the longest length so the normal equations stay well conditioned."""
    scale = float(max((max(b) for b, _ in samples if b), default=1) or 1)
    rows = [(1.0, sum(b) / scale, sum(n * n for n in b) / scale ** 2, t) for b, t in samples]
    normal = [[sum(r[i] * r[j] for r in rows) for j in range(3)] + [sum(r[i] * r[3]
                                                                       for r in rows)]
              for i in range(3)]
    a, b, c = _solve3(normal)
    return PrefillCostFit(a, b / scale, c / scale ** 2)


def _solve3(m: list[list[float]]) -> tuple[float, float, float]:
    """Gaussian elimination with partial pivoting on a 3x4 augmented matrix."""
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            raise ValueError("prefill cost samples do not determine A, B and C")
        m[col], m[pivot] = m[pivot], m[col]
        for row in range(3):
            if row != col:
                f = m[row][col] / m[col][col]
                m[row] = [x - f * y for x, y in zip(m[row], m[col], strict=True)]
    return m[0][3] / m[0][0], m[1][3] / m[1][1], m[2][3] / m[2][2]


@dataclass(frozen=True)
class PrefillGroup:
    """One batch of the plan: requests (indices into the sorted lengths) on ranks."""

    requests: tuple[int, ...]
    ranks: tuple[int, ...]
    time_s: float


@dataclass(frozen=True)
class PrefillPlan:
    cost: float  # sum over requests of predicted TTFT / length
    groups: tuple[PrefillGroup, ...]

    @property
    def time_s(self) -> float:
        """The iteration lasts as long as its slowest group."""
        return max((g.time_s for g in self.groups), default=0.0)


def plan_prefill(lengths: Sequence[int], needs: Sequence[int], ranks: Sequence[int],
                 free_tokens: Callable[[int], int], fits: dict[int, PrefillCostFit],
                 max_sp_batch: int = 1, max_batch_tokens: int = 0) -> list[PrefillPlan | None]:
    """The best plan using at most the first j ranks of `ranks`, for j = 0..len(ranks).

    lengths: prompt lengths sorted longest first; needs: the KV tokens each must find free in
    its group; fits: degree -> fitted cost (the allowed degrees); max_sp_batch: most requests
    in a group of more than one rank (0 = no limit); max_batch_tokens: most prompt tokens in a
    one-rank group's batch (one step's token budget; a larger group runs its requests in SP
    steps of one each; 0 = no limit). A group of m ranks holds a batch when
    its free tokens cover the batch's needs (one rank: that rank's). None where nothing fits.
    """
    n, num_ranks = len(lengths), len(ranks)
    inf = math.inf
    best = [[inf] * (num_ranks + 1) for _ in range(n + 1)]  # [served][used ranks]
    back: list[list[tuple[int, int] | None]] = [[None] * (num_ranks + 1) for _ in range(n + 1)]
    best[0] = [0.0] * (num_ranks + 1)  # serving nobody costs nothing, ranks may stay idle
    free = [0]
    for r in ranks:
        free.append(free[-1] + free_tokens(r))
    for i in range(1, n + 1):
        for j in range(1, num_ranks + 1):
            for m, fit in fits.items():
                if m > j:
                    continue
                group_free = free[j] - free[j - m]
                limit = i if m == 1 or max_sp_batch == 0 else min(i, max_sp_batch)
                need = sum_len = sum_sq = inv = 0.0
                for k in range(1, limit + 1):  # the batch is requests [i-k, i)
                    length = lengths[i - k]
                    need += needs[i - k]
                    if need > group_free:
                        break
                    sum_len, sum_sq, inv = sum_len + length, sum_sq + length ** 2, inv + 1 / length
                    if max_batch_tokens and m == 1 and sum_len > max_batch_tokens:
                        break
                    cost = best[i - k][j - m] + fit.time(sum_len, sum_sq) * inv
                    if cost < best[i][j]:
                        best[i][j], back[i][j] = cost, (k, m)
    plans: list[PrefillPlan | None] = []
    for j in range(num_ranks + 1):
        used = min(range(j + 1), key=lambda x: best[n][x])
        plans.append(None if best[n][used] == inf else
                     _unwind(back, best[n][used], n, used, lengths, ranks, fits))
    return plans


def _unwind(back, cost: float, i: int, j: int, lengths: Sequence[int], ranks: Sequence[int],
            fits: dict[int, PrefillCostFit]) -> PrefillPlan:
    groups = []
    while i > 0:  # NOTE: ranks before the first group stay idle (best[0][j] = 0)
        k, m = back[i][j]
        batch = lengths[i - k:i]
        groups.append(PrefillGroup(tuple(range(i - k, i)), tuple(ranks[j - m:j]),
                                   fits[m].batch_time(batch)))
        i, j = i - k, j - m
    return PrefillPlan(cost, tuple(reversed(groups)))
