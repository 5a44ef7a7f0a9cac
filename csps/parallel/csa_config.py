"""CsaConfig: the level ladder of CSA sparse SP prefill attention (algorithms.md §2.2).

Written as comma-separated "group_size:stride" pairs, e.g. "1:1,2:4,4:8": level 0 must be
"1:1" (the worker itself, dense local causal attention); level l >= 1 groups g_l contiguous
ranks (rank r is in group r // g_l) and keeps every s_l-th key per head. Group sizes strictly
increase, each dividing the next, so groups nest; the top group must be the whole SP group
(checked against the group size at call time, check_sp_size). Pure Python: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

FAR_QUERIES = ("all", "sampled")


@dataclass(frozen=True)
class CsaConfig:
    """levels: ((group_size, stride), ...), level 0 first; far_queries: "all" (every local
    query attends the far ranks' sampled K/V, which travel) or "sampled" (the prototype: only
    the sampled query rows travel to the key holders; the other rows get no far context)."""

    levels: tuple[tuple[int, int], ...]
    far_queries: str = "all"

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

    @classmethod
    def parse(cls, text: str, far_queries: str = "all") -> CsaConfig:
        """"1:1,2:4,4:8" -> CsaConfig(((1, 1), (2, 4), (4, 8))); ValueError on bad input."""
        levels = []
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"CSA level {item.strip()!r} in {text!r}: want group_size:stride")
            levels.append((int(parts[0]), int(parts[1])))
        return cls(tuple(levels), far_queries)

    @property
    def text(self) -> str:
        """The parse() form: "1:1,2:4,4:8"."""
        return ",".join(":".join(str(x) for x in level) for level in self.levels)

    def check_sp_size(self, sp_size: int) -> None:
        """The top level must cover the whole SP group, or some ranks would never be seen."""
        if self.levels[-1][0] != sp_size:
            raise ValueError(f"CSA top group size {self.levels[-1][0]} must equal the SP "
                             f"group size {sp_size} (levels {self.text})")
