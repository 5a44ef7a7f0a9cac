"""BlockPool: one rank's KV blocks as plain integers, with automatic prefix caching. No torch.

Every block has a reference count: the requests whose block tables hold it. A block nobody holds
is free; free blocks wait in one queue in LRU order, and allocation takes them from its head. A
free block may still hold a computed prefix block, registered under its block hash
(kvcache/block_hash.py): a later request with the same prefix takes it back (`touch`) instead of
recomputing it, until allocation evicts it, which drops its hash. A block in use is never
evicted. Freed blocks join the tail, so the longest-unused go first (vLLM's free queue).

Returns None when a request does not fit instead of raising (style.md example 3); freeing a block
nobody holds is a bug and raises.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_cnt = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block id -> block hash, for cached blocks
        self._block_of: dict[int, int] = {}  # block hash -> block id
        self.num_evictions = 0  # cached blocks reused for other KV since start
        self.version = 0  # changes whenever the set of cached hashes does

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocation may hand out: empty ones and evictable cached ones."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0-1 (vLLM's kv_cache_usage_perc)."""
        return self.num_used_blocks / self.num_blocks

    def used_block_ids(self) -> frozenset[int]:
        """The blocks some request holds."""
        return frozenset(b for b, n in enumerate(self._ref_cnt) if n)

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Hand out `num_blocks` free blocks (evicting cached ones, oldest first), or None (and
        nothing) if too few are free."""
        if num_blocks > len(self._free):
            return None
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block_hash = self._hash_of.pop(block_id, None)
            if block_hash is not None:
                del self._block_of[block_hash]
                self.num_evictions += 1
                self.version += 1
            self._ref_cnt[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference to each block (a prefix-cache hit); a free one leaves the
        free queue."""
        for block_id in block_ids:
            if self._ref_cnt[block_id] == 0:
                del self._free[block_id]
            self._ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; those nobody holds join the free queue's tail in
        the order given (callers pass a request's blocks last first, so its tail goes first)."""
        for block_id in block_ids:
            if self._ref_cnt[block_id] < 1:
                raise RuntimeError(f"block {block_id} freed but not allocated")
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                self._free[block_id] = None

    # ---- the prefix cache ----------------------------------------------------------------------
    def cached_block(self, block_hash: int) -> int | None:
        """The block holding the prefix block of this hash, if cached."""
        return self._block_of.get(block_hash)

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Register a block in use, now computed and full, under its hash. A hash already
        cached in another block keeps that one (the same KV computed twice at once)."""
        if self._ref_cnt[block_id] < 1:
            raise RuntimeError(f"block {block_id} cached but not in use")
        if block_hash in self._block_of or block_id in self._hash_of:
            return
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        self.version += 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks and references stay as they are)."""
        self._hash_of.clear()
        self._block_of.clear()
        self.version += 1

    def check_invariants(self) -> None:
        """Raise if the bookkeeping is inconsistent (used by tests after every step)."""
        if any(n < 0 for n in self._ref_cnt):
            raise AssertionError("a negative reference count")
        free = {b for b, n in enumerate(self._ref_cnt) if n == 0}
        if free != set(self._free):
            raise AssertionError("the free queue is not exactly the blocks nobody holds")
        if {self._block_of[h] for h in self._hash_of.values()} != set(self._hash_of) or len(
                self._block_of) != len(self._hash_of):
            raise AssertionError("the hash maps disagree")
