"""Synthetic length workloads shaped like LoongServe's evaluation sets (ShareGPT, L-Eval,
LV-Eval and their equal mix "mixed"), written as Mooncake JSONL traces. No torch.

Each shape draws prompt and output lengths (tokens) from a clipped distribution chosen to match
the public statistics of the dataset as LoongServe preprocessed it (docs/loongserve.md gives
every figure's source and which ones are assumptions); arrivals are a Poisson process at the
requested rate. Everything comes from one seed: same seed, same trace, byte for byte. A
request's prompt is clipped so that prompt + output fits the model's context.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csps.bench.arrivals import arrival_times


@dataclass(frozen=True, slots=True)
class LogNormal:
    """exp(N(ln median, sigma^2)), rounded and clipped to [low, high]."""
    median: float
    sigma: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.low <= self.high):
            raise ValueError(f"bad log-normal {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        values = np.rint(rng.lognormal(math.log(self.median), self.sigma, n))
        return np.clip(values, self.low, self.high).astype(np.int64)

    def mean(self) -> float:
        """The clipped distribution's mean (before rounding)."""
        mu, s = math.log(self.median), self.sigma
        if s == 0:
            return float(min(max(self.median, self.low), self.high))
        def cdf(x: float) -> float:
            return 0.5 * (1 + math.erf(x / math.sqrt(2)))
        za, zb = (math.log(self.low) - mu) / s, (math.log(self.high) - mu) / s
        inside = math.exp(mu + s * s / 2) * (cdf(zb - s) - cdf(za - s))
        return inside + self.low * cdf(za) + self.high * (1 - cdf(zb))


@dataclass(frozen=True, slots=True)
class Levels:
    """One of `levels` (equally likely) times a uniform factor in [1 - jitter, 1 + jitter],
    rounded and clipped to [low, high]: LV-Eval's five length levels."""
    levels: tuple[int, ...]
    jitter: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not self.levels or min(self.levels) < 1 or not 0 <= self.jitter < 1 or \
                not 1 <= self.low <= self.high:
            raise ValueError(f"bad length levels {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        base = rng.choice(np.asarray(self.levels, dtype=float), n)
        values = np.rint(base * rng.uniform(1 - self.jitter, 1 + self.jitter, n))
        return np.clip(values, self.low, self.high).astype(np.int64)

    def mean(self) -> float:
        """The mean before clipping (the levels' mean)."""
        return float(np.mean(self.levels))


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    inputs: LogNormal | Levels
    outputs: LogNormal | Levels


# Sources and assumptions: docs/loongserve.md, "LoongServe's own setting, simulated".
SHAREGPT = Shape("sharegpt", LogNormal(900, 1.0, 16, 200_000), LogNormal(150, 1.0, 4, 999))
LEVAL = Shape("leval", LogNormal(12_000, 0.8, 3_000, 200_000), LogNormal(60, 1.0, 4, 1_024))
LVEVAL = Shape("lveval", Levels((20_800, 41_600, 83_200, 166_400, 332_800), 0.15, 16, 500_000),
               LogNormal(15, 0.8, 4, 256))
SHAPES = {s.name: s for s in (SHAREGPT, LEVAL, LVEVAL)}
WORKLOADS = (*SHAPES, "mixed")  # mixed: equal thirds of the three, shuffled (LoongServe's 1:1:1)


def sample_lengths(workload: str, num: int, context: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) tokens of `num` requests; prompt + output <= context."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if num < 0 or context < 8:
        raise ValueError(f"need num >= 0 and context >= 8, got {num}, {context}")
    rng = np.random.default_rng(seed)
    if workload == "mixed":
        counts = [num // 3 + (i < num % 3) for i in range(3)]
        pairs = [p for shape, k in zip(SHAPES.values(), counts, strict=True)
                 for p in _pairs(shape, rng, k, context)]
        return [pairs[i] for i in rng.permutation(len(pairs))]
    return _pairs(SHAPES[workload], rng, num, context)


def _pairs(shape: Shape, rng: np.random.Generator, n: int, context: int) -> list[tuple[int, int]]:
    inputs, outputs = shape.inputs.sample(rng, n), shape.outputs.sample(rng, n)
    outputs = np.minimum(outputs, context // 2)
    inputs = np.minimum(inputs, context - outputs)
    return list(zip(inputs.tolist(), outputs.tolist(), strict=True))


def trace_rows(workload: str, num: int, rate: float, context: int, seed: int = 0) -> list[dict]:
    """Mooncake records (timestamp in ms) with Poisson arrivals at `rate` req/s."""
    times = arrival_times(num, rate, 1.0, seed=seed + 1)
    return [{"timestamp": round(t * 1000.0, 3), "input_length": i, "output_length": o}
            for t, (i, o) in zip(times, sample_lengths(workload, num, context, seed), strict=True)]


def write_trace(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
