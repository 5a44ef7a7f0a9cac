"""SpAttention: how one SP prefill computes attention across its group's chunks, as a typed value.

The scheduler decides it for every SP prefill it emits (the deployment's default, or the sps2
configurator's choice for that request), so a ScheduledRequest says it whole: the algorithm and,
for CSA, the complete CsaConfig (levels, far queries, micro-batch). Workers and the cost model
read it as it is; nobody fills in a default later. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from csps.contract.csa_config import CsaConfig

SP_ALGORITHMS = ("ulysses", "allgather_kv", "ring", "csa")


@dataclass(frozen=True)
class SpAttention:
    """algorithm: one of SP_ALGORITHMS; csa: its CsaConfig, given exactly when algorithm is
    "csa" (its top level must be the group's size: `for_group`)."""

    algorithm: str = "ulysses"
    csa: CsaConfig | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in SP_ALGORITHMS:
            raise ValueError(f"unknown SP attention {self.algorithm!r}; known: {SP_ALGORITHMS}")
        if (self.algorithm == "csa") != (self.csa is not None):
            raise ValueError("a CsaConfig goes with SP attention 'csa' and only with it, got "
                             f"{self.algorithm!r} with {self.csa}")

    @classmethod
    def parse(cls, algorithm: str, csa_levels: str = "1:1,2:2", far_queries: str = "all",
              micro_batch: str = "") -> SpAttention:
        """From the CLI's strings (--sp-attention, --csa-levels, --csa-far-queries,
        --csa-micro-batch); the CSA strings are read only for "csa"."""
        if algorithm != "csa":
            return cls(algorithm)
        return cls("csa", CsaConfig.parse(csa_levels, far_queries, micro_batch))

    def for_group(self, size: int) -> SpAttention:
        """This choice on a group of `size` ranks. CSA levels whose top group is not `size`
        (the deployment's default on a sub-group) become '1:1,size:2' (one far level at
        stride 2; dense '1:1' for a single rank), keeping far queries and micro-batch."""
        if self.csa is None or self.csa.levels[-1][0] == size:
            return self
        levels = ((1, 1),) if size == 1 else ((1, 1), (size, 2))
        return replace(self, csa=replace(self.csa, levels=levels))

    def with_csa(self, levels: str | None = None, micro_batch: str | None = None) -> SpAttention:
        """CSA with other levels and / or micro-batch (None: keep this one's)."""
        if self.csa is None:
            raise ValueError(f"{self.algorithm!r} has no CSA levels to replace")
        heads, tokens = (CsaConfig.parse_micro_batch(micro_batch) if micro_batch is not None
                         else (self.csa.micro_batch_heads, self.csa.micro_batch_tokens))
        levels_of = CsaConfig.parse(levels).levels if levels is not None else self.csa.levels
        return replace(self, csa=replace(self.csa, levels=levels_of, micro_batch_heads=heads,
                                         micro_batch_tokens=tokens))

    @property
    def is_exact(self) -> bool:
        """True when it computes dense attention exactly (CSA only at stride 1 everywhere, with
        every far query): the KV it leaves is then what any exact algorithm leaves."""
        return self.csa is None or (all(stride == 1 for _, stride in self.csa.levels)
                                    and self.csa.far_queries == "all")

    @property
    def text(self) -> str:
        """e.g. 'ulysses', 'csa 1:1,2:2' (for logs and tables)."""
        return self.algorithm if self.csa is None else f"csa {self.csa.text}"
