"""KVCacheManager: each request's block table on top of the BlockPool. No torch."""

from __future__ import annotations

from csps.kvcache.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_blocks

    def has_blocks(self, request_id: str) -> bool:
        return bool(self._block_tables.get(request_id))

    def block_ids(self, request_id: str) -> list[int]:
        return self._block_tables.get(request_id, [])

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks needed for the request to hold `num_tokens` tokens in total."""
        return max(0, cdiv(num_tokens, self.block_size) - len(self.block_ids(request_id)))

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens` tokens. False (and nothing) if short."""
        needed = self.num_blocks_needed(request_id, num_tokens)
        new_blocks = self.block_pool.allocate(needed)
        if new_blocks is None:
            return False
        self._block_tables.setdefault(request_id, []).extend(new_blocks)
        return True

    def free(self, request_id: str) -> None:
        """Return all of the request's blocks to the pool (a no-op for an unknown request)."""
        self.block_pool.free(self._block_tables.pop(request_id, []))

    def check_invariants(self) -> None:
        self.block_pool.check_invariants()
        owned = [b for table in self._block_tables.values() for b in table]
        if len(owned) != len(set(owned)):
            raise AssertionError("a block is owned by two requests")
        if len(owned) != self.block_pool.num_used_blocks:
            raise AssertionError("used blocks are not all owned by live requests")
