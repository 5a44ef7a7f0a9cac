"""Collectives on one explicit process group, with per-phase byte accounting (algorithms.md §2).

Bytes are logical: what this rank's own data must travel to other ranks (its share of an
all-to-all, its tensor x (P-1) in an all-gather, one tensor per ring hop), whatever algorithm
the backend runs underneath. Times are wall time spent inside the calls, waits included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from csps.contract.step import COMM_PHASES as PHASES


def _zeros() -> dict:
    return dict.fromkeys(PHASES, 0)


@dataclass
class CommStats:
    """Traffic of one rank, per phase; shared by the Communicators of that rank. NOTE: on
    CUDA the times are launch plus wait times, not kernel times, unless the caller syncs."""

    bytes_sent: dict[str, int] = field(default_factory=_zeros)  # phase -> bytes
    num_calls: dict[str, int] = field(default_factory=_zeros)  # phase -> collective calls
    time_s: dict[str, float] = field(default_factory=_zeros)  # phase -> seconds in calls

    def record(self, phase: str, num_bytes: int, seconds: float) -> None:
        if phase not in self.bytes_sent:
            raise ValueError(f"unknown phase {phase!r}; known: {PHASES}")
        self.bytes_sent[phase] += num_bytes
        self.num_calls[phase] += 1
        self.time_s[phase] += seconds

    def reset(self) -> None:
        for counter in (self.bytes_sent, self.num_calls, self.time_s):
            counter.update(dict.fromkeys(counter, 0))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator:
    """Collectives of one phase on one group. Every rank of the group must make the same calls
    in the same order; shapes are checked locally and raise ValueError on mismatch."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; known: {PHASES}")
        self.group, self.stats, self.phase = group, stats, phase
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_to_all(self, inputs: Sequence[torch.Tensor],
                   output_shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """inputs[j] (any shape) goes to rank j; returns outputs[j], shaped output_shapes[j],
        which rank j sent here. Splits may be uneven or empty; one dtype for all."""
        return self.start_all_to_all(inputs, output_shapes).wait()

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """tensor [sizes[rank], *rest] from every rank -> [sum(sizes), *rest] in rank order."""
        if len(sizes) != self.size or tensor.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: shape {tuple(tensor.shape)} vs sizes {sizes}")
        if len(set(sizes)) > 1:  # NOTE: gloo's all_gather rejects uneven shapes
            rest = tuple(tensor.shape[1:])
            parts = self.all_to_all([tensor] * self.size, [(n, *rest) for n in sizes])
            return torch.cat(parts)
        start = time.perf_counter()
        tensor = tensor.contiguous()
        out = tensor.new_empty(self.size * tensor.shape[0], *tensor.shape[1:])
        if self.size == 1:
            out.copy_(tensor)
        else:
            dist.all_gather_single(out, tensor, group=self.group)
        seconds = time.perf_counter() - start
        self.stats.record(self.phase, _nbytes(tensor) * (self.size - 1), seconds)
        return out

    def reduce_scatter(self, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """tensor [sum(sizes), *rest] on every rank -> this rank's row block (the sizes[rank]
        rows after sum(sizes[:rank])) summed over ranks: [sizes[rank], *rest]."""
        if len(sizes) != self.size or tensor.shape[0] != sum(sizes):
            raise ValueError(f"rank {self.rank}: shape {tuple(tensor.shape)} vs sizes {sizes}")
        rest = tuple(tensor.shape[1:])
        if len(set(sizes)) > 1:  # uneven: send row block j to rank j, add what comes back
            parts = self.all_to_all(list(tensor.split(list(sizes))),
                                    [(sizes[self.rank], *rest)] * self.size)
            return torch.stack(parts).sum(dim=0)
        start = time.perf_counter()
        tensor = tensor.contiguous()
        out = tensor.new_empty(sizes[self.rank], *rest)
        if self.size == 1:
            out.copy_(tensor)
        else:
            dist.reduce_scatter_single(out, tensor, group=self.group)
        sent = _nbytes(tensor) // self.size * (self.size - 1)
        self.stats.record(self.phase, sent, time.perf_counter() - start)
        return out

    def start_ring_shift(self, tensor: torch.Tensor,
                         recv_shape: Sequence[int]) -> PendingShift:
        """Send tensor to rank+1 and receive a recv_shape tensor from rank-1, asynchronously.

        Returns a PendingShift; call wait() once before reading the result or reusing tensor.
        """
        if self.size == 1:
            raise ValueError("a ring needs at least two ranks")
        start = time.perf_counter()
        send = tensor.contiguous()
        recv = send.new_empty(*recv_shape)
        ops = [dist.P2POp(dist.isend, send, group=self.group,
                          group_peer=(self.rank + 1) % self.size),
               dist.P2POp(dist.irecv, recv, group=self.group,
                          group_peer=(self.rank - 1) % self.size)]
        works = dist.batch_isend_irecv(ops)
        return PendingShift(self, works, send, recv, time.perf_counter() - start)

    def start_all_to_all(self, inputs: Sequence[torch.Tensor],
                         output_shapes: Sequence[Sequence[int]]) -> PendingAllToAll:
        """all_to_all, asynchronously (async_op=True): returns a PendingAllToAll whose wait()
        gives the outputs and records the bytes and time (launch plus wait) like all_to_all.
        Several may be in flight; every rank must start them in the same order."""
        if len(inputs) != self.size or len(output_shapes) != self.size:
            raise ValueError(f"need {self.size} inputs and output shapes")
        if len({t.dtype for t in inputs}) != 1:
            raise ValueError("all_to_all inputs must share one dtype")
        start = time.perf_counter()
        in_numels = [t.numel() for t in inputs]
        out_numels = [math.prod(s) for s in output_shapes]
        send = torch.cat([t.reshape(-1) for t in inputs])  # [sum(in_numels)], contiguous
        work = None
        if self.size == 1:
            recv = send
        else:
            recv = send.new_empty(sum(out_numels))  # [sum(out_numels)]
            work = dist.all_to_all_single(recv, send, out_numels, in_numels, group=self.group,
                                          async_op=True)
        sent = (sum(in_numels) - in_numels[self.rank]) * send.element_size()
        return PendingAllToAll(self, work, send, recv, out_numels, output_shapes, sent,
                               time.perf_counter() - start)


class PendingShift:
    """One ring hop in flight: holds the send buffer alive until wait()."""

    def __init__(self, comm: Communicator, works: list, send: torch.Tensor,
                 recv: torch.Tensor, launch_s: float) -> None:
        self._comm, self._works, self._send, self._recv = comm, works, send, recv
        self._launch_s = launch_s
        self._done = False

    def wait(self) -> torch.Tensor:
        """Block until the hop completes; returns the received tensor. Only once."""
        if self._done:
            raise RuntimeError("PendingShift.wait() called twice")
        start = time.perf_counter()
        for work in self._works:
            work.wait()
        self._done = True
        seconds = self._launch_s + time.perf_counter() - start
        self._comm.stats.record(self._comm.phase, _nbytes(self._send), seconds)
        return self._recv


class PendingAllToAll:
    """One all-to-all in flight: holds the send buffer alive until wait()."""

    def __init__(self, comm: Communicator, work, send: torch.Tensor, recv: torch.Tensor,
                 out_numels: list[int], output_shapes: Sequence[Sequence[int]], sent: int,
                 launch_s: float) -> None:
        self._comm, self._work, self._send, self._recv = comm, work, send, recv
        self._out_numels, self._shapes, self._sent = out_numels, output_shapes, sent
        self._launch_s = launch_s
        self._done = False

    def wait(self) -> list[torch.Tensor]:
        """Block until done; returns outputs[j] shaped output_shapes[j], from rank j. Once."""
        if self._done:
            raise RuntimeError("PendingAllToAll.wait() called twice")
        start = time.perf_counter()
        if self._work is not None:
            self._work.wait()
        self._done = True
        self._send = None
        outputs = [part.view(*shape) for part, shape
                   in zip(self._recv.split(self._out_numels), self._shapes, strict=True)]
        seconds = self._launch_s + time.perf_counter() - start
        self._comm.stats.record(self._comm.phase, self._sent, seconds)
        return outputs
