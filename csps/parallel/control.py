"""Control messages under torchrun: pickled Python objects broadcast from rank 0 (the engine) to
every rank and gathered back to rank 0, on explicit gloo groups (torchrun_executor.py).

Each object travels as its pickle: a length first, then the bytes. Rank 0 counts what it sends
and receives in the "control" phase of a CommStats (bytes as in comm.py: what crosses ranks).
A peer that dies breaks its TCP connections, so a pending call raises at once (RuntimeError);
a peer that stalls makes it raise after the group's timeout. A failed rank also leaves its
error in the rendezvous store (post_error), where rank 0 reads it (posted_errors) to name the
cause of a broken collective.
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from csps.parallel.comm import CommStats

ERROR_KEY = "csps/control/error/{rank}"  # store key of a rank's pickled error payload


def new_control_group(timeout_s: float) -> dist.ProcessGroup:
    """A gloo group over the whole world whose calls raise after timeout_s. Collective: every
    rank must create the same control groups in the same order."""
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo",
                          timeout=timedelta(seconds=timeout_s))


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def broadcast_object(obj: Any, group: dist.ProcessGroup,
                     stats: CommStats | None = None) -> Any:
    """Group rank 0's `obj` on every rank (the others pass None)."""
    start = time.perf_counter()
    root = dist.get_rank(group) == 0
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if root else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, group=group, group_src=0)
    buffer = _as_tensor(data) if root else torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buffer, group=group, group_src=0)
    if stats is not None and root:
        peers = dist.get_world_size(group) - 1
        stats.record("control", (len(data) + size.element_size()) * peers,
                     time.perf_counter() - start)
    return obj if root else pickle.loads(buffer.numpy().tobytes())


def gather_objects(obj: Any, group: dist.ProcessGroup,
                   stats: CommStats | None = None) -> list[Any] | None:
    """Every rank's `obj`, in group rank order, on group rank 0; None on the others."""
    start = time.perf_counter()
    world, root = dist.get_world_size(group), dist.get_rank(group) == 0
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    # NOTE: gloo's gather needs one size on every rank: pad every pickle to the longest
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = _as_tensor(data)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)] if root else None
    dist.gather(padded, parts, group=group, group_dst=0)
    if not root:
        return None
    if stats is not None:
        received = sum(int(s.item()) + size.element_size() for s in sizes[1:])
        stats.record("control", received, time.perf_counter() - start)
    return [pickle.loads(part[:int(s.item())].numpy().tobytes())
            for part, s in zip(parts, sizes, strict=True)]


def post_error(payload: Any) -> None:
    """Leave this rank's error (picklable) in the rendezvous store for rank 0; never raises."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(ERROR_KEY.format(rank=dist.get_rank()), pickle.dumps(payload))
    except Exception:  # noqa: BLE001 - best effort: the rank is failing anyway
        pass


def posted_errors() -> dict[int, Any]:
    """rank -> payload of every rank that posted an error; {} when none did or unreadable."""
    try:
        store = dist.distributed_c10d._get_default_store()
        keys = {r: ERROR_KEY.format(rank=r) for r in range(dist.get_world_size())}
        return {r: pickle.loads(store.get(key)) for r, key in keys.items() if store.check([key])}
    except Exception:  # noqa: BLE001 - the store may be gone with its host
        return {}
