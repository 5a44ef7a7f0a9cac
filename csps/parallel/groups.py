"""Process groups of one SP x TP deployment: world = sp_size * tp_size (algorithms.md §2.1).

Global rank = sp_rank * tp_size + tp_rank: the TP group of a rank is the ranks with its
sp_rank (adjacent ranks, the fast links), its SP group the ranks with its tp_rank. Started from
the standard torchrun variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the SP x TP grid and the groups it talks on."""

    world_size: int  # sp_size * tp_size processes
    rank: int  # global rank, sp_rank * tp_size + tp_rank
    sp_size: int  # ranks that split one prompt's sequence
    tp_size: int  # ranks that split heads and MLP columns
    sp_rank: int  # position in the SP group = index of this rank's sequence chunk
    tp_rank: int  # position in the TP group
    sp_group: dist.ProcessGroup  # ranks with this tp_rank, in sp_rank order
    tp_group: dist.ProcessGroup  # ranks with this sp_rank, in tp_rank order
    cpu_group: dist.ProcessGroup  # gloo over the whole world, for control messages
    backend: str  # "gloo" or "nccl": the backend of sp_group and tp_group
    # (first sp_rank, size) -> the group of SP ranks first .. first + size - 1 with this
    # tp_rank, for every such contiguous part of the SP group that holds this rank: the groups
    # of steps on part of the SP group (per-instance steps, sub-group SP prefills).
    sp_subgroups: dict[tuple[int, int], dist.ProcessGroup] = field(default_factory=dict)

    @property
    def sp_ranks(self) -> list[int]:
        """Global ranks of this rank's SP group, in sp_rank order."""
        return [s * self.tp_size + self.tp_rank for s in range(self.sp_size)]

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this rank's TP group, in tp_rank order."""
        return [self.sp_rank * self.tp_size + t for t in range(self.tp_size)]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def find_free_port() -> int:
    """A TCP port free on this host now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_parallel_groups(sp_size: int, tp_size: int,
                         backend: str | None = None) -> ParallelGroups:
    """Join the world (env:// rendezvous) unless already joined, then build the SP/TP groups.

    Every rank must call this with the same sizes: each new_group call is collective. It may be
    called again in the same world with other sizes (tests do); the old groups stay valid until
    destroy_parallel_groups(). Raises ValueError when sizes do not multiply to WORLD_SIZE.
    """
    if sp_size < 1 or tp_size < 1:
        raise ValueError(f"sp_size and tp_size must be positive, got {sp_size}, {tp_size}")
    backend = backend or default_backend()
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if sp_size * tp_size != world_size:
        raise ValueError(f"sp_size * tp_size = {sp_size} * {tp_size} != world size {world_size}")
    sp_rank, tp_rank = divmod(rank, tp_size)
    # NOTE: new_group is collective over the whole world, so every rank creates every group
    # in the same order and keeps the ones it belongs to.
    tp_group = sp_group = None
    for s in range(sp_size):
        group = dist.new_group([s * tp_size + t for t in range(tp_size)], backend=backend)
        tp_group = group if s == sp_rank else tp_group
    for t in range(tp_size):
        group = dist.new_group([s * tp_size + t for s in range(sp_size)], backend=backend)
        sp_group = group if t == tp_rank else sp_group
    cpu_group = dist.new_group(list(range(world_size)), backend="gloo")
    subgroups = {}
    for size in range(1, sp_size):  # the whole SP group is sp_group
        for first in range(sp_size - size + 1):
            for t in range(tp_size):
                group = dist.new_group([s * tp_size + t for s in range(first, first + size)],
                                       backend=backend)
                if t == tp_rank and first <= sp_rank < first + size:
                    subgroups[(first, size)] = group
    subgroups[(0, sp_size)] = sp_group
    return ParallelGroups(world_size=world_size, rank=rank, sp_size=sp_size, tp_size=tp_size,
                          sp_rank=sp_rank, tp_rank=tp_rank, sp_group=sp_group,
                          tp_group=tp_group, cpu_group=cpu_group, backend=backend,
                          sp_subgroups=subgroups)


def destroy_parallel_groups() -> None:
    """Leave the world and free every group; a no-op when not joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
