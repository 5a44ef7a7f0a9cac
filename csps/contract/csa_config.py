"""CsaConfig: the level ladder of CSA sparse SP prefill attention (algorithms.md §2.2).

Written as comma-separated "group_size:stride" pairs, e.g. "1:1,2:4,4:8": level 0 must be
"1:1" (the worker itself, dense local causal attention); level l >= 1 groups g_l contiguous
ranks (rank r is in group r // g_l) and keeps every s_l-th key per head. Group sizes strictly
increase, each dividing the next, so groups nest; the top group must be the whole SP group
(checked against the group size at call time, check_sp_size). Micro-batches (§2.3, 0 = no
split): micro_batch_heads KV heads (with their query heads) x micro_batch_tokens travelling rows
per head and sender; either > 0 pipelines the far levels (csa_pipeline.py), "4x100" in text.
Pure Python: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

FAR_QUERIES = ("all", "sampled")


@dataclass(frozen=True)
class CsaConfig:
    """levels: ((group_size, stride), ...), level 0 first; far_queries: "all" (every local
    query attends the far ranks' sampled K/V, which travel) or "sampled" (the prototype: only
    the sampled query rows travel to the key holders; the other rows get no far context);
    micro_batch_heads / micro_batch_tokens: the pipeline's micro-batch, 0 = whole."""

    levels: tuple[tuple[int, int], ...]
    far_queries: str = "all"
    micro_batch_heads: int = 0
    micro_batch_tokens: int = 0

    def __post_init__(self) -> None:
        try:
            levels = tuple(tuple(level) for level in self.levels)
        except TypeError as err:
            raise ValueError(f"CSA levels {self.levels!r}: want ((group, stride), ...)") from err
        object.__setattr__(self, "levels", levels)
        for level in levels:
            if len(level) != 2 or not all(isinstance(x, int) and x >= 1 for x in level):
                raise ValueError(f"CSA level {level!r}: want (group_size >= 1, stride >= 1)")
        if not levels or levels[0] != (1, 1):
            raise ValueError(f"CSA levels must start with 1:1 (dense local); got {self.text!r}")
        for (small, _), (big, _) in zip(levels, levels[1:], strict=False):
            if big <= small or big % small:
                raise ValueError(f"CSA group sizes must increase, each dividing the next; "
                                 f"got {self.text!r}")
        if self.far_queries not in FAR_QUERIES:
            raise ValueError(f"far_queries {self.far_queries!r}; known: {FAR_QUERIES}")
        for size in (self.micro_batch_heads, self.micro_batch_tokens):
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"CSA micro-batch sizes must be ints >= 0; got {size!r}")

    @classmethod
    def parse(cls, text: str, far_queries: str = "all", micro_batch: str = "") -> CsaConfig:
        """"1:1,2:4,4:8" -> CsaConfig(((1, 1), (2, 4), (4, 8))); ValueError on bad input.
        micro_batch: "HEADSxTOKENS" (e.g. "4x100"; "" or "0x0" = no pipelining)."""
        levels = []
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"CSA level {item.strip()!r} in {text!r}: want group_size:stride")
            levels.append((int(parts[0]), int(parts[1])))
        heads, tokens = cls.parse_micro_batch(micro_batch)
        return cls(tuple(levels), far_queries, heads, tokens)

    @staticmethod
    def parse_micro_batch(text: str) -> tuple[int, int]:
        """"4x100" -> (4, 100); "" -> (0, 0); ValueError on bad input."""
        if not text.strip():
            return 0, 0
        parts = text.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"CSA micro-batch {text!r}: want HEADSxTOKENS, e.g. 4x100")
        return int(parts[0]), int(parts[1])

    @property
    def pipelined(self) -> bool:
        """Whether the far levels run as a micro-batch pipeline (csa_pipeline.py)."""
        return self.micro_batch_heads > 0 or self.micro_batch_tokens > 0

    @property
    def text(self) -> str:
        """The parse() form: "1:1,2:4,4:8"."""
        return ",".join(":".join(str(x) for x in level) for level in self.levels)

    def check_sp_size(self, sp_size: int) -> None:
        """The top level must cover the whole SP group, or some ranks would never be seen."""
        if self.levels[-1][0] != sp_size:
            raise ValueError(f"CSA top group size {self.levels[-1][0]} must equal the SP "
                             f"group size {sp_size} (levels {self.text})")
