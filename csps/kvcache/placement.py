"""Where a sequence-parallel request's KV lives: which SP rank holds which token range and blocks.

No torch. The scheduler-side record of algorithms.md §2.1 and §2.4: a prompt's prefill is split
into contiguous chunks over the ranks of an SP group, each rank keeping its chunk's KV in its own
paged pool; decode tokens' KV is then appended on one rank, the least loaded of the group.
Every range starts on a fresh block, so no block is shared by two ranges or two ranks; blocks
are shared between requests only through the prefix cache (prefix_cache.py): a request placed
with a cached prefix starts with the prefix's ranges, wherever they lie, and its own ranges
follow from the prefix's end.
Returns None/False when a request does not fit; misuse (bad arguments) raises ValueError.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from csps.contract.token_range import TokenRange
from csps.kvcache.block_hash import TokenSource
from csps.kvcache.block_pool import BlockPool
from csps.kvcache.kv_cache_manager import cdiv
from csps.kvcache.kv_moves import KvMoveBooks
from csps.kvcache.prefix_cache import NO_PREFIX, CachedPrefix, PrefixCache


def split_prompt(num_tokens: int, sp_size: int, block_size: int) -> list[int]:
    """Contiguous chunk lengths of a num_tokens prompt over sp_size ranks, in rank order.

    Rule: with at least sp_size blocks' worth of tokens (cdiv(num_tokens, block_size) >= sp_size)
    whole blocks are dealt out as evenly as possible, the extra blocks going to the last ranks,
    and only the last chunk may end in a partial block: every boundary is block-aligned and the
    chunks differ by at most one block. Shorter prompts cannot be aligned without leaving a rank
    empty, so tokens are split evenly instead, larger shares first (every chunk >= 1 token when
    num_tokens >= sp_size; trailing ranks get 0 when num_tokens < sp_size).
    """
    if num_tokens < 0 or sp_size < 1 or block_size < 1:
        raise ValueError(f"bad split: num_tokens={num_tokens} sp_size={sp_size} "
                         f"block_size={block_size}")
    num_blocks = cdiv(num_tokens, block_size)
    if num_blocks < sp_size:
        base, extra = divmod(num_tokens, sp_size)
        return [base + (1 if r < extra else 0) for r in range(sp_size)]
    base, extra = divmod(num_blocks, sp_size)
    lens = [block_size * (base + (1 if r >= sp_size - extra else 0)) for r in range(sp_size)]
    lens[-1] -= num_blocks * block_size - num_tokens  # the final block may be partial
    return lens


@dataclass(frozen=True)
class RequestPlacement:
    """A request's ranges in position order; they tile [0, num_tokens) without gaps."""

    request_id: str
    ranges: tuple[TokenRange, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", tuple(self.ranges))
        pos = 0
        for r in self.ranges:
            if r.start != pos or r.end <= r.start:
                raise ValueError(f"ranges of {self.request_id} are not contiguous from 0: "
                                 f"{[(x.start, x.end) for x in self.ranges]}")
            pos = r.end

    @property
    def num_tokens(self) -> int:
        return self.ranges[-1].end if self.ranges else 0

    def with_last_range(self, last: TokenRange) -> RequestPlacement:
        """This placement with its last range replaced by one that starts where it did (a
        grown range). NOTE: skips the tiling check, which such a range cannot break."""
        if last.start != self.ranges[-1].start or last.end <= last.start:
            raise ValueError(f"{last} does not replace the last range of {self.request_id}")
        placement = object.__new__(RequestPlacement)
        object.__setattr__(placement, "request_id", self.request_id)
        object.__setattr__(placement, "ranges", self.ranges[:-1] + (last,))
        if "_rank_tuple" in self.__dict__ and last.rank == self.ranges[-1].rank:
            placement.__dict__["_rank_tuple"] = self._rank_tuple  # the same ranks
        return placement

    @property
    def ranks(self) -> list[int]:
        """Ranks holding some of the request's KV, sorted."""
        return list(self._rank_tuple)

    @functools.cached_property
    def _rank_tuple(self) -> tuple[int, ...]:
        return tuple(sorted({r.rank for r in self.ranges}))

    def range_of(self, position: int) -> TokenRange:
        if not 0 <= position < self.num_tokens:
            raise ValueError(f"position {position} outside [0, {self.num_tokens})")
        return self.ranges[bisect.bisect_right([r.start for r in self.ranges], position) - 1]

    def tokens_on(self, rank: int) -> int:
        return sum(r.num_tokens for r in self.ranges if r.rank == rank)


class DistributedKVCacheManager(KvMoveBooks):
    """One BlockPool per SP rank plus each request's placement and SP group (and the KV moves
    in flight, kv_moves.py)."""

    def __init__(self, num_ranks: int, num_blocks_per_rank: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        if num_ranks < 1 or block_size < 1:
            raise ValueError(f"bad sizes: num_ranks={num_ranks} block_size={block_size}")
        self.block_size = block_size
        self.pools = [BlockPool(num_blocks_per_rank) for _ in range(num_ranks)]
        self.prefix_cache = PrefixCache(self.pools, block_size, enable_prefix_caching)
        self._placements: dict[str, RequestPlacement] = {}
        self._groups: dict[str, tuple[int, ...]] = {}
        self._sticky: set[str] = set()  # requests whose decode KV stays put while it fits
        self._init_moves()

    def placement(self, request_id: str) -> RequestPlacement | None:
        return self._placements.get(request_id)

    def group(self, request_id: str) -> tuple[int, ...]:
        """The ranks a placed request's KV may grow onto (its decode group)."""
        return self._groups[request_id]

    def widen_group(self, request_id: str, rank: int) -> None:
        """Scale up: let a placed request's decode KV grow onto `rank` too. Its new blocks then
        stay on the rank of its last range while that has room (sticky), and move to the
        group's least-loaded rank only then."""
        if not 0 <= rank < len(self.pools) or request_id not in self._groups:
            raise ValueError(f"cannot widen {request_id!r} onto rank {rank}")
        self._groups[request_id] = tuple(sorted(set(self._groups[request_id]) | {rank}))
        self._sticky.add(request_id)

    def can_admit(self, chunk_lens: Sequence[int], ranks: Sequence[int]) -> bool:
        """True when every rank of the group (distinct ranks) has the blocks for its chunk."""
        if (len(chunk_lens) != len(ranks) or not ranks or len(set(ranks)) != len(ranks)
                or any(not 0 <= r < len(self.pools) for r in ranks) or min(chunk_lens) < 0):
            raise ValueError(f"bad group: chunk_lens={list(chunk_lens)} ranks={list(ranks)}")
        return all(cdiv(n, self.block_size) <= self.pools[r].num_free_blocks
                   for n, r in zip(chunk_lens, ranks, strict=True))

    def find_cached_prefix(self, request: TokenSource, num_tokens: int,
                           ranks: Sequence[int] | None = None) -> CachedPrefix:
        """The cached prefix of the request's first num_tokens tokens on `ranks` (default:
        any); nothing is held until it is placed with it."""
        return self.prefix_cache.find(request, num_tokens, None if ranks is None else list(ranks))

    def allocate_prefill(self, request_id: str, chunk_lens: Sequence[int],
                         ranks: Sequence[int], sticky: bool = False,
                         prefix: CachedPrefix = NO_PREFIX,
                         num_prompt_tokens: int = 0) -> RequestPlacement | None:
        """Place chunk_lens[i] on ranks[i] (the SP group, kept for decode) after the cached
        `prefix` (held from now; its ranks join the group; num_prompt_tokens counts the query);
        None if any is short. sticky: decode KV stays on the last range's rank while it has
        room, and moves to the group's least-loaded rank only then (LoongServe's scale-up
        under memory pressure)."""
        if request_id in self._placements:
            raise ValueError(f"request {request_id} is already placed")
        self.can_admit(chunk_lens, ranks)  # checks the group
        return self.allocate_ranges(request_id, chunk_lens, ranks, ranks, prefix,
                                    num_prompt_tokens, sticky)

    def allocate_ranges(self, request_id: str, lens: Sequence[int], ranks: Sequence[int],
                        group: Sequence[int], prefix: CachedPrefix = NO_PREFIX,
                        num_prompt_tokens: int = 0,
                        sticky: bool = False) -> RequestPlacement | None:
        """Place a prompt as ranges in position order: the cached `prefix`'s (held from now),
        then lens[i] tokens on ranks[i] (a rank may hold several: a chunked SP prefill's
        slices), each from a fresh block; `group` (with the prefix's ranks) is the request's
        decode group; num_prompt_tokens counts the prefix-cache query. None (nothing
        changes) if any rank is short of blocks."""
        if request_id in self._placements:
            raise ValueError(f"request {request_id} is already placed")
        if len(lens) != len(ranks) or not set(ranks) <= set(group) or min(lens, default=0) < 0:
            raise ValueError(f"bad ranges: lens={list(lens)} ranks={list(ranks)} "
                             f"group={list(group)}")
        need = [0] * len(self.pools)
        for n, r in zip(lens, ranks, strict=True):
            need[r] += cdiv(n, self.block_size)
        for held in prefix.ranges:  # a free cached block leaves the free queue when held
            need[held.rank] += sum(1 for b in held.block_ids
                                   if not self.pools[held.rank].ref_count(b))
        if any(need[r] > pool.num_free_blocks for r, pool in enumerate(self.pools)):
            return None
        if num_prompt_tokens or prefix.ranges:
            self.prefix_cache.hold(request_id, prefix, num_prompt_tokens)
        ranges, start = list(prefix.ranges), prefix.num_tokens
        for n, r in zip(lens, ranks, strict=True):
            if n > 0:
                blocks = self.pools[r].allocate(cdiv(n, self.block_size))
                ranges.append(TokenRange(r, start, start + n, tuple(blocks)))
                start += n
        self._groups[request_id] = tuple(sorted(set(group) | set(prefix.ranks))) \
            if prefix.ranges else tuple(group)
        if sticky:
            self._sticky.add(request_id)
        self._placements[request_id] = RequestPlacement(request_id, ranges)
        return self._placements[request_id]

    def cache_computed(self, request: TokenSource, num_computed_tokens: int) -> None:
        """Register the request's full blocks among its first num_computed_tokens tokens on
        the ranks holding them."""
        placement = self._placements.get(request.request_id)
        if placement is not None:
            self.prefix_cache.register(request, placement.ranges, num_computed_tokens)

    def append_slots(self, request_id: str, num_new_tokens: int) -> TokenRange | None:
        """Make room for num_new_tokens more tokens; the range holding the newest one, or None.

        Tokens first fill the room left in the last range's last block (no allocation, same
        rank). Tokens that need new blocks all go to the group's least-loaded rank (fewest used
        blocks, ties to the lowest rank): the last range grows if it is on that rank, else a new
        range starts there. A rank is kept while its block has room and chosen anew per new
        block, so decode KV spreads over the group block by block; None changes nothing.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        placement = self._placements[request_id]
        end = placement.num_tokens + num_new_tokens
        if placement.ranges:  # fast path (most decode steps): the last block has room
            last = placement.ranges[-1]
            if end <= last.start + len(last.block_ids) * self.block_size:
                grown = TokenRange(last.rank, last.start, end, last.block_ids)
                self._placements[request_id] = placement.with_last_range(grown)
                return grown
        ranges = list(placement.ranges)
        if ranges:  # fill the room in the last block
            last = ranges[-1]
            ranges[-1] = replace(last, end=min(end, last.start + len(last.block_ids)
                                               * self.block_size))
        covered = ranges[-1].end if ranges else 0
        if end > covered:
            need = cdiv(end - covered, self.block_size)
            rank = min(self._groups[request_id], key=lambda r: (self.pools[r].num_used_blocks, r))
            if (request_id in self._sticky and ranges
                    and self.pools[ranges[-1].rank].num_free_blocks >= need):
                rank = ranges[-1].rank
            blocks = self.pools[rank].allocate(need)
            if blocks is None:
                return None
            if ranges and ranges[-1].rank == rank:
                ranges[-1] = replace(ranges[-1], end=end,
                                     block_ids=ranges[-1].block_ids + tuple(blocks))
            else:
                ranges.append(TokenRange(rank, covered, end, tuple(blocks)))
        self._placements[request_id] = RequestPlacement(request_id, ranges)
        return ranges[-1] if ranges else None

    # ---- the KVCacheManager interface the scheduler uses -------------------------------------
    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow a placed request to hold num_tokens tokens in all; False (no change) if short."""
        grow = num_tokens - self._placements[request_id].num_tokens
        return grow <= 0 or self.append_slots(request_id, grow) is not None

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._placements

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def num_free_blocks(self) -> int:
        return sum(pool.num_free_blocks for pool in self.pools)

    @property
    def num_total_blocks(self) -> int:
        return sum(pool.num_blocks for pool in self.pools)

    def free(self, request_id: str) -> None:
        """Return all the request's blocks on every rank (a no-op for an unknown request)."""
        self._groups.pop(request_id, None)
        self._sticky.discard(request_id)
        self._free_pending(request_id)
        self.prefix_cache.forget(request_id)
        for r in reversed(getattr(self._placements.pop(request_id, None), "ranges", ())):
            self.pools[r.rank].free(reversed(r.block_ids))  # its tail is evicted first

    def usage_per_rank(self) -> list[float]:
        return [pool.usage for pool in self.pools]

    def total_free_tokens(self, ranks: Sequence[int] | None = None) -> int:
        """Free token slots over `ranks` (default: all); admission counts its group's total."""
        ranks = range(len(self.pools)) if ranks is None else ranks
        return sum(self.pools[r].num_free_blocks for r in ranks) * self.block_size

    def slot_mapping(self, request_id: str, start: int, end: int, rank: int) -> list[int]:
        """Slots (block_id * block_size + offset) in rank's cache of positions [start, end)."""
        slots, bs = [], self.block_size
        for r in self._placements[request_id].ranges:
            lo, hi = max(start, r.start), min(end, r.end)
            if lo < hi and r.rank != rank:
                raise ValueError(f"positions {lo}..{hi - 1} of {request_id} are on rank {r.rank}")
            slots.extend(r.block_ids[(p - r.start) // bs] * bs + (p - r.start) % bs
                         for p in range(lo, hi))
        if len(slots) != max(0, end - start):
            raise ValueError(f"[{start}, {end}) is not inside {request_id}'s positions")
        return slots

    def check_invariants(self) -> None:
        """Raise AssertionError if any pool or placement is inconsistent: every block's
        reference count is the number of live requests holding it."""
        held = self._pending_held()
        for rid, placement in self._placements.items():
            pos, mine = 0, [set() for _ in self.pools]
            for r in placement.ranges:
                if r.start != pos or r.end <= r.start or r.rank not in self._groups[rid]:
                    raise AssertionError(f"{rid}: bad range {r}")
                if len(r.block_ids) != cdiv(r.num_tokens, self.block_size):
                    raise AssertionError(f"{rid}: range {r} has the wrong number of blocks")
                if mine[r.rank] & set(r.block_ids) or len(set(r.block_ids)) != len(r.block_ids):
                    raise AssertionError(f"{rid}: a block on rank {r.rank} is held twice")
                mine[r.rank].update(r.block_ids)
                held[r.rank].update(r.block_ids)
                pos = r.end
        for pool, blocks in zip(self.pools, held, strict=True):
            pool.check_invariants()
            if set(blocks) != pool.used_block_ids() or any(
                    pool.ref_count(b) != n for b, n in blocks.items()):
                raise AssertionError("reference counts are not the live requests' blocks")
