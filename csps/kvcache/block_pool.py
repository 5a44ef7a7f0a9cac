"""BlockPool: the free list of KV cache blocks, as plain integers. No torch.

Returns None when a request does not fit instead of raising (style.md example 3); freeing a block
twice or one it never handed out is a bug and raises.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0-1 (vLLM's kv_cache_usage_perc)."""
        return len(self._used) / self.num_blocks

    def used_block_ids(self) -> frozenset[int]:
        """The blocks handed out and not yet freed."""
        return frozenset(self._used)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Hand out `num_blocks` free blocks, or None (and nothing) if too few are free."""
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        self._used.update(block_ids)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if block_id not in self._used:
                raise RuntimeError(f"block {block_id} freed but not allocated")
            self._used.remove(block_id)
            self._free.append(block_id)

    def check_invariants(self) -> None:
        """Raise if the bookkeeping is inconsistent (used by tests after every step)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if free & self._used:
            raise AssertionError("a block is both free and used")
        if len(free) + len(self._used) != self.num_blocks:
            raise AssertionError("free + used != total")
