"""TokenRange: which positions of a request one SP rank holds, and in which of its blocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenRange:
    """Positions [start, end) of a request, held on `rank` in blocks block_ids (from offset 0)."""

    rank: int
    start: int
    end: int
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.rank < 0 or not 0 <= self.start <= self.end:
            raise ValueError(f"bad token range rank={self.rank} [{self.start}, {self.end})")
        object.__setattr__(self, "block_ids", tuple(self.block_ids))  # hashable, immutable

    @property
    def num_tokens(self) -> int:
        return self.end - self.start
