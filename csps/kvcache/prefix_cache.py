"""The prefix cache over one or several ranks' BlockPools: lookup, hits, registration. No torch.

Each rank's BlockPool maps block hashes to its cached blocks; this module reads them together.
A request's cached prefix is the longest run of its block hashes, from position 0, each found on
some rank, tiled by the fewest ranges (at each start, the rank whose run reaches farthest); it stops
before the prompt's last token, which is always recomputed for its logits (vLLM's rule). The
KV of a computed full block is registered on the rank that holds it once it is computed, unless
the request's KV is lossy (`mark_uncacheable`). The managers (kv_cache_manager.py,
placement.py) own the block tables; this class owns the hashes and the hit/query counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from csps.contract.token_range import TokenRange
from csps.kvcache.block_hash import BlockHashBook, TokenSource
from csps.kvcache.block_pool import BlockPool


@dataclass(frozen=True)
class CachedPrefix:
    """A request's cached prefix: block-aligned ranges tiling [0, num_tokens), in order."""

    ranges: tuple[TokenRange, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.ranges[-1].end if self.ranges else 0

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r.rank for r in self.ranges}))

    def block_ids_on(self, rank: int) -> list[int]:
        return [b for r in self.ranges if r.rank == rank for b in r.block_ids]

    def leaving(self, num_tokens: int, at_least: int, block_size: int) -> CachedPrefix:
        """This prefix cut by whole blocks so that a num_tokens prompt has at least
        `at_least` tokens after it (every rank of an SP group then computes some)."""
        end = max(0, (num_tokens - at_least) // block_size * block_size)
        if end >= self.num_tokens:
            return self
        kept = []
        for r in self.ranges:
            if r.start >= end:
                break
            cut = min(r.end, end)
            kept.append(TokenRange(r.rank, r.start, cut,
                                   r.block_ids[:(cut - r.start) // block_size]))
        return CachedPrefix(tuple(kept))


NO_PREFIX = CachedPrefix()


@dataclass
class PrefixCacheStats:
    """Cumulative prompt tokens looked up and found (vLLM's prefix_cache_queries / hits)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class PrefixCache:
    def __init__(self, pools: list[BlockPool], block_size: int, enabled: bool = True) -> None:
        self.pools = pools
        self.block_size = block_size
        self.enabled = enabled
        self.stats = PrefixCacheStats()
        self._hashes = BlockHashBook(block_size)
        self._num_registered: dict[str, int] = {}  # request -> leading blocks registered
        self._uncacheable: set[str] = set()
        # request -> (the pools' versions, ranks, tokens) it was found for, and the prefix
        self._found: dict[str, tuple[tuple, CachedPrefix]] = {}
        self._pending: dict[int, str] = {}  # hash of a block being prefilled -> its request

    def find(self, request: TokenSource, num_tokens: int, ranks: list[int] | None = None
             ) -> CachedPrefix:
        """The longest cached prefix of the request's first num_tokens tokens, short of the
        last one, on `ranks` (default: any rank). Reads only: nothing is held yet."""
        if not self.enabled or num_tokens < 2:
            return NO_PREFIX
        ranks = list(range(len(self.pools))) if ranks is None else ranks
        key = (tuple(pool.version for pool in self.pools), tuple(ranks), num_tokens)
        memo = self._found.get(request.request_id)
        if memo is not None and memo[0] == key:
            return memo[1]  # nothing cached has changed since (a waiting head, asked again)
        prefix = self._find(request, num_tokens, ranks)
        self._found[request.request_id] = (key, prefix)
        return prefix

    def _find(self, request: TokenSource, num_tokens: int, ranks: list[int]) -> CachedPrefix:
        """Greedy cover from position 0: at each start, the rank whose run of cached blocks
        reaches farthest (the lower rank on a tie), so the prefix lies in as few ranges as
        any choice allows. A block every rank caches (a shared system prompt) thus does not
        split a prefix whose rest one rank holds."""
        hashes = list(self._hashes.hashes(request, num_tokens - 1))
        ranges: list[TokenRange] = []
        j = 0
        while j < len(hashes):
            rank, blocks = -1, []
            for r in ranks:
                run = self._run(r, hashes, j)
                if len(run) > len(blocks):
                    rank, blocks = r, run
            if not blocks:
                break
            ranges.append(TokenRange(rank, j * self.block_size,
                                     (j + len(blocks)) * self.block_size, tuple(blocks)))
            j += len(blocks)
        return CachedPrefix(tuple(ranges))

    def _run(self, rank: int, hashes: list[int], start: int) -> list[int]:
        """The block ids of `rank`'s cached run of hashes[start:], up to its first miss."""
        pool, run = self.pools[rank], []
        for block_hash in islice(hashes, start, None):  # (no copy of the list)
            block = pool.cached_block(block_hash)
            if block is None:
                break
            run.append(block)
        return run

    def hold(self, request_id: str, prefix: CachedPrefix, num_prompt_tokens: int) -> None:
        """Take references to a prefix found for an admitted request, and count the query."""
        for r in prefix.ranges:
            self.pools[r.rank].touch(r.block_ids)
        self._num_registered[request_id] = prefix.num_tokens // self.block_size
        if self.enabled:
            self.stats.queries += num_prompt_tokens
            self.stats.hits += prefix.num_tokens

    def expect(self, request: TokenSource, num_cached_tokens: int) -> None:
        """An admitted request will compute its prompt's full blocks after its cached prefix:
        until they are computed, another request starting with them waits (`is_pending`)."""
        if not self.enabled:
            return
        hashes = self._hashes.hashes(request, request.num_prompt_tokens - 1)
        for block_hash in hashes[num_cached_tokens // self.block_size:]:
            self._pending.setdefault(block_hash, request.request_id)

    def is_pending(self, request: TokenSource, prefix: CachedPrefix) -> bool:
        """True when the block after the request's cached prefix is being computed by another
        request: it will be cached within that request's prefill, so waiting for it beats
        computing it twice (the `n` samples of one prompt, one document asked twice at once)."""
        if not self._pending:
            return False
        hashes = self._hashes.hashes(request, request.num_prompt_tokens - 1)
        j = prefix.num_tokens // self.block_size
        owner = self._pending.get(hashes[j]) if j < len(hashes) else None
        return owner is not None and owner != request.request_id

    def _done(self, request_id: str, hashes: list[int]) -> None:
        for block_hash in hashes:
            if self._pending.get(block_hash) == request_id:
                del self._pending[block_hash]

    def mark_uncacheable(self, request_id: str) -> None:
        """The request's KV is not what exact attention computes (CSA with sparsity): none of
        its blocks may serve another request (nor be waited for)."""
        self._uncacheable.add(request_id)
        self._done(request_id, self._hashes.hashes_so_far(request_id))

    def register(self, request: TokenSource, ranges: tuple[TokenRange, ...],
                 num_computed_tokens: int) -> None:
        """Register the request's full blocks computed so far (ranges: where its KV lives).
        Only blocks of block-aligned ranges are whole blocks of the hash chain."""
        rid = request.request_id
        if not self.enabled or rid in self._uncacheable:
            return
        done, bs = self._num_registered.get(rid, 0), self.block_size
        want = num_computed_tokens // bs
        if want <= done:
            return
        hashes = self._hashes.hashes(request, want * bs)
        self._done(rid, hashes[done:want])  # computed, cached or not (an unaligned range)
        for r in ranges:
            if r.start % bs or r.start >= want * bs:
                continue
            first = max(done, r.start // bs)
            last = min(want, r.start // bs + len(r.block_ids), r.end // bs)
            for j in range(first, last):
                self.pools[r.rank].cache_block(r.block_ids[j - r.start // bs], hashes[j])
        self._num_registered[rid] = want

    def forget(self, request_id: str) -> None:
        """The request's blocks were freed (finished or preempted)."""
        self._done(request_id, self._hashes.hashes_so_far(request_id))
        self._hashes.forget(request_id)
        self._found.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        self._uncacheable.discard(request_id)
