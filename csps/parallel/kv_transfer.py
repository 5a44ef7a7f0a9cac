"""A step's KV moves on the workers (contract KvMove; sps2's consolidation after an SP prefill):
whole blocks of every layer copied from the source rank's paged cache into the destination's.

Every rank of the step's group runs `move_kv_blocks` with the same moves (ranks counted in the
group), one all-to-all per layer: a rank sends what it is the source of, receives what it is
the destination of, and sends and receives nothing otherwise, so the collective is the same on
all ranks. Under TP each TP member moves its own KV heads on its own SP group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from csps.contract.step import KvMove
from csps.kvcache.paged_cache import KVCache
from csps.parallel.comm import Communicator


def move_kv_blocks(comm: Communicator, kv_caches: Sequence[KVCache],
                   moves: Sequence[KvMove]) -> None:
    """Run `moves` (ranks of comm's group) on this rank's caches."""
    rank, size = comm.rank, comm.size
    send = [[] for _ in range(size)]  # [dst] -> this rank's source block ids, in move order
    recv = [[] for _ in range(size)]  # [src] -> this rank's destination block ids
    for move in moves:
        if not (0 <= move.src.rank < size and 0 <= move.dst.rank < size):
            raise ValueError(f"{move.request_id}: move {move.src.rank} -> {move.dst.rank} "
                             f"outside the step's {size} ranks")
        if move.src.rank == rank:
            send[move.dst.rank] += move.src.block_ids
        if move.dst.rank == rank:
            recv[move.src.rank] += move.dst.block_ids
    device = kv_caches[0].k_cache.device
    send_ids = [torch.tensor(ids, dtype=torch.long, device=device) for ids in send]
    recv_ids = [torch.tensor(ids, dtype=torch.long, device=device) for ids in recv]
    block_shape = tuple(kv_caches[0].k_cache.shape[1:])  # [block_size, kv_heads, head_dim]
    shapes = [(2, len(ids), *block_shape) for ids in recv]
    for cache in kv_caches:
        inputs = [torch.stack((cache.k_cache.index_select(0, ids),  # [2, B, bs, Hkv, D]
                               cache.v_cache.index_select(0, ids))) for ids in send_ids]
        for ids, kv in zip(recv_ids, comm.all_to_all(inputs, shapes), strict=True):
            if len(ids):
                cache.k_cache.index_copy_(0, ids, kv[0])
                cache.v_cache.index_copy_(0, ids, kv[1])
