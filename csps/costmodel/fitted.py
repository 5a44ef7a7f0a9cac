"""FittedCostModel: an iteration priced by coefficients fitted to measured steps (csps profile).

Per rank: compute = tokens * per_token_s + seqs * per_seq_s + sampled * per_sampled_s
+ attn_pairs * per_attn_pair_s + decode_kv_tokens * per_decode_kv_token_s; communication =
bytes * per_byte_s + collectives * per_collective_s, of which overlappable_bytes * per_byte_s
hides behind compute (at most all of it). The iteration takes its slowest rank plus
per_iteration_s. Coefficients are non-negative, fitted by NNLS (nnls.py) on relative error.
JSON: {"kind": "fitted", "shape", "parallel", "coefficients", "fit", "machine", "date"}. No torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from csps.costmodel.base import RankWork
from csps.costmodel.nnls import nnls
from csps.costmodel.shape import ModelShape

# The coefficients, in the order of `features` (per_iteration_s first: the constant column).
COEFFICIENTS = ("per_iteration_s", "per_token_s", "per_seq_s", "per_sampled_s",
                "per_attn_pair_s", "per_decode_kv_token_s", "per_byte_s", "per_collective_s")


def features(work: RankWork) -> list[float]:
    """The regressors of one rank's time, COEFFICIENTS order. NOTE: for fitting, the
    overlappable bytes count as hidden (the rule's usual case); rank_time applies the cap."""
    return [1.0, work.num_tokens, work.num_seqs, work.num_sampled, work.attn_pairs,
            work.decode_kv_tokens, work.total_bytes - work.overlappable_bytes,
            work.num_collectives]


@dataclass(frozen=True)
class FittedCostModel:
    per_iteration_s: float = 0.0  # fixed per iteration: schedule, control, launch
    per_token_s: float = 0.0  # dense layers (projections, MLP, norms) per token
    per_seq_s: float = 0.0  # per sequence with tokens on the rank (metadata, per-request ops)
    per_sampled_s: float = 0.0  # LM head and sampler per sampled token
    per_attn_pair_s: float = 0.0  # prefill attention per (query, key) pair, all layers
    per_decode_kv_token_s: float = 0.0  # decode attention per KV position read, all layers
    per_byte_s: float = 0.0  # per byte sent
    per_collective_s: float = 0.0  # per collective call (latency)
    name: str = "fitted"
    shape: ModelShape | None = None  # the model measured
    parallel: dict = field(default_factory=dict)  # the layout measured (sp_size, tp_size, ...)
    fit: dict = field(default_factory=dict)  # held-out error, sample counts
    machine: dict = field(default_factory=dict)  # host, cores, load average, torch version
    date: str = ""  # ISO date of the measurement

    def __post_init__(self) -> None:
        for coef in COEFFICIENTS:
            value = getattr(self, coef)
            if not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
                raise ValueError(f"{coef} must be a finite number >= 0, got {value!r}")

    @property
    def coefficients(self) -> dict[str, float]:
        return {coef: getattr(self, coef) for coef in COEFFICIENTS}

    def compute_time(self, work: RankWork) -> float:
        return (work.num_tokens * self.per_token_s + work.num_seqs * self.per_seq_s
                + work.num_sampled * self.per_sampled_s + work.attn_pairs * self.per_attn_pair_s
                + work.decode_kv_tokens * self.per_decode_kv_token_s)

    def rank_time(self, work: RankWork) -> float:
        compute = self.compute_time(work)
        comm = work.total_bytes * self.per_byte_s + work.num_collectives * self.per_collective_s
        hidden = min(work.overlappable_bytes * self.per_byte_s, compute)
        return compute + comm - hidden

    def iteration_time(self, works: Sequence[RankWork]) -> float:
        return max((self.rank_time(w) for w in works), default=0.0) + self.per_iteration_s

    @classmethod
    def fit_steps(cls, steps: Sequence[Sequence[RankWork]], times_s: Sequence[float],
                  rounds: int = 5, trim: float = 0.2, **info) -> FittedCostModel:
        """NNLS on relative error (each step's row divided by its time, so short steps count
        as much as long ones). Two things are re-estimated each round: the slowest rank of
        each step (first guess: most tokens + pairs + KV reads; then the fitted model's), and
        which steps to trust: after the first round the `trim` fraction worst fitted is left
        out (a shared machine's stalls only ever add time, in bursts)."""
        times = np.asarray(times_s, dtype=float)  # [S]
        if len(steps) != len(times) or not len(times) or (times <= 0).any():
            raise ValueError("need one positive time per step")
        if not 0 <= trim < 1:
            raise ValueError(f"trim must be in [0, 1), got {trim}")
        critical = [max(w, key=lambda r: r.num_tokens + r.attn_pairs + r.decode_kv_tokens)
                    for w in steps]
        kept = np.arange(len(times))  # the steps fitted this round
        model = cls(**info)
        for _ in range(rounds):
            a = np.array([features(critical[i]) for i in kept]) / times[kept, None]  # [K, 8]
            coefs = nnls(a, np.ones(len(kept)))
            model = cls(**dict(zip(COEFFICIENTS, map(float, coefs), strict=True)), **info)
            critical = [max(w, key=model.rank_time) for w in steps]
            errors = np.array(model.relative_errors(steps, times))  # [S]
            num_kept = max(len(COEFFICIENTS), int(round(len(times) * (1 - trim))))
            kept = np.sort(np.argsort(errors, kind="stable")[:num_kept])
        return model

    def relative_errors(self, steps: Sequence[Sequence[RankWork]],
                        times_s: Sequence[float]) -> list[float]:
        """|predicted - measured| / measured per step."""
        return [abs(self.iteration_time(w) - t) / t for w, t in zip(steps, times_s, strict=True)]

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": "fitted", "name": self.name,
                "shape": None if self.shape is None else dataclasses.asdict(self.shape),
                "parallel": self.parallel, "coefficients": self.coefficients, "fit": self.fit,
                "machine": self.machine, "date": self.date}

    @classmethod
    def from_dict(cls, data: dict) -> FittedCostModel:
        if data.get("kind") != "fitted":
            raise ValueError(f"not a fitted cost model: kind {data.get('kind')!r}")
        unknown = set(data["coefficients"]) - set(COEFFICIENTS)
        if unknown:
            raise ValueError(f"unknown coefficients {sorted(unknown)}")
        shape = data.get("shape")
        return cls(**{k: float(v) for k, v in data["coefficients"].items()},
                   name=data.get("name", "fitted"),
                   shape=None if shape is None else ModelShape(**shape),
                   parallel=data.get("parallel", {}), fit=data.get("fit", {}),
                   machine=data.get("machine", {}), date=data.get("date", ""))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> FittedCostModel:
        return cls.from_dict(json.loads(Path(path).read_text()))
