"""KVCacheManager: each request's block table on one BlockPool, with automatic prefix caching.

No torch. A request admitted with a cached prefix (`find_cached_prefix`, then `allocate_slots`
with it) starts its table with the cached blocks, shared with every other request holding them;
the blocks it computes are registered as they fill (`cache_computed`), so later requests hit.
"""

from __future__ import annotations

from collections import Counter

from csps.contract.token_range import TokenRange
from csps.kvcache.block_hash import TokenSource
from csps.kvcache.block_pool import BlockPool
from csps.kvcache.prefix_cache import NO_PREFIX, CachedPrefix, PrefixCache


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.pools = [self.block_pool]  # the prefix cache's view: rank 0 only
        self.prefix_cache = PrefixCache(self.pools, block_size, enable_prefix_caching)
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

    def find_cached_prefix(self, request: TokenSource, num_tokens: int,
                           ranks: list[int] | None = None) -> CachedPrefix:
        """The cached prefix of the request's first num_tokens tokens (nothing held yet);
        `ranks` as the distributed manager takes it (this pool is rank 0)."""
        return self.prefix_cache.find(request, num_tokens, ranks)

    def allocate_slots(self, request_id: str, num_tokens: int,
                       prefix: CachedPrefix = NO_PREFIX, num_prompt_tokens: int = 0) -> bool:
        """Grow the request's table to hold `num_tokens` tokens, a new request's table starting
        with its cached `prefix` (held from now; num_prompt_tokens counts the query). False
        (and nothing) if short."""
        if prefix.ranges:
            if request_id in self._block_tables:
                raise ValueError(f"request {request_id} already holds blocks")
            self.prefix_cache.hold(request_id, prefix, num_prompt_tokens)
            self._block_tables[request_id] = prefix.block_ids_on(0)
        elif num_prompt_tokens:
            self.prefix_cache.hold(request_id, NO_PREFIX, num_prompt_tokens)
        needed = self.num_blocks_needed(request_id, num_tokens)
        new_blocks = self.block_pool.allocate(needed)
        if new_blocks is None:
            if prefix.ranges or num_prompt_tokens:
                self._undo_admission(request_id, prefix, num_prompt_tokens)
            return False
        self._block_tables.setdefault(request_id, []).extend(new_blocks)
        return True

    def _undo_admission(self, request_id: str, prefix: CachedPrefix,
                        num_prompt_tokens: int) -> None:
        self.block_pool.free(reversed(self._block_tables.pop(request_id, [])))
        self.prefix_cache.forget(request_id)
        stats = self.prefix_cache.stats
        if self.prefix_cache.enabled:
            stats.queries -= num_prompt_tokens
            stats.hits -= prefix.num_tokens

    def cache_computed(self, request: TokenSource, num_computed_tokens: int) -> None:
        """Register the request's full blocks among its first num_computed_tokens tokens."""
        table = self._block_tables.get(request.request_id)
        if table:
            held = TokenRange(0, 0, len(table) * self.block_size, tuple(table))
            self.prefix_cache.register(request, (held,), num_computed_tokens)

    def free(self, request_id: str) -> None:
        """Drop the request's references (a no-op for an unknown request); its computed blocks
        stay cached until evicted, its last block first."""
        self.block_pool.free(reversed(self._block_tables.pop(request_id, [])))
        self.prefix_cache.forget(request_id)

    def check_invariants(self) -> None:
        self.block_pool.check_invariants()
        held = Counter(b for table in self._block_tables.values() for b in table)
        if any(self.block_pool.ref_count(b) != n for b, n in held.items()) or (
                len(held) != self.block_pool.num_used_blocks):
            raise AssertionError("reference counts are not the live requests' block tables")
        if any(len(set(t)) != len(t) for t in self._block_tables.values()):
            raise AssertionError("a block appears twice in one block table")
