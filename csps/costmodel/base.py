"""The contract every cost model keeps: one iteration's work per rank in, seconds out.

`work.iteration_work(output, ...)` turns a SchedulerOutput into one RankWork per worker rank,
counted the way the workers run it (which rank runs which tokens, attends over which keys,
sends how many bytes). A CostModel prices a RankWork; an iteration lasts as long as its
slowest rank plus a fixed per-iteration cost (scheduling, the control broadcast, sampling).
The fitted CPU model (`fitted`) and the GPU roofline (`roofline`) implement it; the simulator
and the policies only see this interface. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class RankWork:
    """One worker rank's share of one iteration. Counts cover all decoder layers unless noted.

    attn_pairs counts (query token, key) pairs of prefill-style attention per layer, in
    full-head units: a rank that attends with h of the model's H query heads adds h/H per
    pair (Ulysses splits heads, so its ranks each add 1/P of the causal pairs).
    decode_kv_tokens counts KV positions read per layer by single-token queries (decode and
    q-move partial attention), which is bound by memory bandwidth rather than compute.
    """

    num_tokens: int = 0  # tokens through the dense layers here (projections, MLP, norms)
    num_seqs: int = 0  # sequences with tokens here (per-sequence overhead)
    num_sampled: int = 0  # tokens sampled here (LM head + sampler)
    attn_pairs: float = 0.0  # prefill attention (query, key) pairs per layer, full-head units
    decode_kv_tokens: int = 0  # KV positions read per layer by single-token queries
    comm_bytes: dict[str, int] = field(default_factory=dict)  # phase -> bytes this rank sends
    num_collectives: int = 0  # collective calls this rank makes (latency term)
    overlappable_bytes: int = 0  # of comm_bytes, what a pipeline may hide behind compute

    def __add__(self, other: RankWork) -> RankWork:
        """Two works on one rank in one iteration: counts add up."""
        comm = dict(self.comm_bytes)
        for phase, num_bytes in other.comm_bytes.items():
            comm[phase] = comm.get(phase, 0) + num_bytes
        return RankWork(self.num_tokens + other.num_tokens, self.num_seqs + other.num_seqs,
                        self.num_sampled + other.num_sampled,
                        self.attn_pairs + other.attn_pairs,
                        self.decode_kv_tokens + other.decode_kv_tokens, comm,
                        self.num_collectives + other.num_collectives,
                        self.overlappable_bytes + other.overlappable_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.comm_bytes.values())

    @property
    def is_idle(self) -> bool:
        return not (self.num_tokens or self.decode_kv_tokens or self.num_collectives)


class CostModel(Protocol):
    """Prices work. Implementations are frozen dataclasses loaded from / saved to JSON."""

    name: str

    def rank_time(self, work: RankWork) -> float:
        """Seconds one rank spends on `work` (compute plus the communication not hidden)."""

    def iteration_time(self, works: Sequence[RankWork]) -> float:
        """Seconds the whole iteration takes: the slowest rank plus fixed per-iteration cost."""
