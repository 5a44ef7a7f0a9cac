"""Moving a placed request's KV onto one SP rank (sps2's consolidation after an SP prefill),
mixed into DistributedKVCacheManager. No torch.

Two phases, because the copy runs inside a step: `plan_moves` allocates the destination blocks
(held as pending until the step ends) and returns the KvMoves the step carries; once the step
is booked, `apply_moves` points the placement at the copies, frees the source blocks and makes
the destination rank the request's whole decode group. A request finished or preempted in
between frees its pending blocks with the rest (`free`). Only ranges the request holds alone
move: blocks shared through the prefix cache stay where they are (then nothing moves).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from csps.contract.step import KvMove
from csps.contract.token_range import TokenRange

if TYPE_CHECKING:
    from csps.kvcache.block_pool import BlockPool
    from csps.kvcache.placement import RequestPlacement


class KvMoveBooks:
    """Needs the manager's pools, block_size, _placements, _groups, _sticky."""

    pools: list[BlockPool]
    _placements: dict[str, RequestPlacement]

    def _init_moves(self) -> None:
        self._pending_moves: dict[str, list[KvMove]] = {}

    def blocks_to_move(self, request_id: str, target: int) -> int:
        """Blocks the request holds on ranks other than `target` (what a move there needs
        free on it), or -1 when some of them are shared with another request."""
        need = 0
        for held in self._placements[request_id].ranges:
            if held.rank == target:
                continue
            if any(self.pools[held.rank].ref_count(b) != 1 for b in held.block_ids):
                return -1
            need += len(held.block_ids)
        return need

    def plan_moves(self, request_id: str, target: int) -> list[KvMove] | None:
        """Allocate blocks on `target` for every range of the request held elsewhere and
        return the moves (empty: already all there); None (nothing changes) when target is
        short of blocks, some range is shared, or moves are already pending."""
        if request_id in self._pending_moves or not 0 <= target < len(self.pools):
            return None
        need = self.blocks_to_move(request_id, target)
        if need < 0 or need > self.pools[target].num_free_blocks:
            return None
        moves = []
        for held in self._placements[request_id].ranges:
            if held.rank != target:
                blocks = self.pools[target].allocate(len(held.block_ids))
                moves.append(KvMove(request_id, held,
                                    TokenRange(target, held.start, held.end, tuple(blocks))))
        if moves:
            self._pending_moves[request_id] = moves
        return moves

    def pending_moves(self, request_id: str) -> list[KvMove]:
        return self._pending_moves.get(request_id, [])

    def apply_moves(self, request_id: str) -> None:
        """The step that copied the request's KV is over: its ranges now live on the target,
        which becomes its decode group (new decode blocks stay there while it has room)."""
        moves = self._pending_moves.pop(request_id, None)
        current = self._placements.get(request_id)
        if not moves or current is None:
            return
        copies = {(m.src.rank, m.src.start): m.dst for m in moves}
        ranges: list[TokenRange] = []
        for held in current.ranges:
            held = copies.get((held.rank, held.start), held)
            last = ranges[-1] if ranges else None
            if (last is not None and last.rank == held.rank
                    and last.num_tokens == len(last.block_ids) * self.block_size):
                held = TokenRange(held.rank, last.start, held.end,
                                  last.block_ids + held.block_ids)  # whole blocks: one range
                ranges.pop()
            ranges.append(held)
        for move in reversed(moves):
            self.pools[move.src.rank].free(reversed(move.src.block_ids))
        target = moves[0].dst.rank
        self._placements[request_id] = type(current)(request_id, ranges)  # RequestPlacement
        self._groups[request_id] = (target,)
        self._sticky.add(request_id)

    def _free_pending(self, request_id: str) -> None:
        for move in self._pending_moves.pop(request_id, ()):
            self.pools[move.dst.rank].free(move.dst.block_ids)

    def _pending_held(self) -> list[Counter[int]]:
        """Per rank, the destination blocks of moves not yet applied."""
        held: list[Counter[int]] = [Counter() for _ in self.pools]
        for moves in self._pending_moves.values():
            for move in moves:
                held[move.dst.rank].update(move.dst.block_ids)
        return held
