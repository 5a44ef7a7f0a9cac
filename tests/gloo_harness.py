"""run_distributed: run fn(rank, world_size, *args) in world_size spawned processes.

Each worker gets the torchrun variables for a free local port (so fn joins with
csps.parallel.groups.init_parallel_groups), one torch thread, and leaves the group on exit.
Results come back pickled in rank order; a worker's exception is re-raised in the parent with
its traceback; a hung or dead worker fails the call after timeout_s instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any


class WorkerError(RuntimeError):
    """A worker raised, died, or did not finish in time; the message has its traceback."""


def _worker(fn: Callable, rank: int, world_size: int, port: int, args: tuple,
            results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch

    from csps.parallel.groups import destroy_parallel_groups

    torch.set_num_threads(1)  # the dev machines have 2 cores for up to 4 ranks
    try:
        # NOTE: plain pickle copies tensors; torch's queue reducers would share them through
        # file descriptors that die with this process.
        payload = ("ok", pickle.dumps(fn(rank, world_size, *args)))
    except BaseException:  # noqa: B036 - everything must reach the parent
        payload = ("error", traceback.format_exc())
    # NOTE: report before leaving the group: leaving breaks the peers' pending collectives,
    # and their secondary errors should not reach the parent first.
    results.put((rank, *payload))
    destroy_parallel_groups()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout_s: float = 120.0) -> list[Any]:
    """fn must be a module-level function (it is pickled into spawned processes)."""
    from csps.parallel.groups import find_free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, args, results),
                         daemon=True) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    suspects: set[int] = set()  # ranks seen dead with no result; a second look confirms
    try:
        deadline = time.monotonic() + timeout_s
        while len(outputs) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                suspects = _check_alive(procs, outputs, suspects, deadline, timeout_s)
                continue
            if status == "error":
                _raise_errors(results, {rank: payload}, world_size - len(outputs), world_size)
            outputs[rank] = pickle.loads(payload)
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:  # stragglers (peers of a failed rank wait in collectives)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [outputs[rank] for rank in range(world_size)]


def _check_alive(procs: list, outputs: dict, suspects: set[int], deadline: float,
                 timeout_s: float) -> set[int]:
    """Raise for ranks dead on two looks without a result (a last message may be in flight
    on the first) or when time is up; returns the ranks dead on this look."""
    dead = {r for r, p in enumerate(procs) if r not in outputs and not p.is_alive()}
    if dead & suspects:
        confirmed = sorted(dead & suspects)
        raise WorkerError(f"ranks {confirmed} died (exit codes "
                          f"{[procs[r].exitcode for r in confirmed]}) without a result")
    if time.monotonic() > deadline:
        missing = [r for r in range(len(procs)) if r not in outputs]
        raise WorkerError(f"ranks {missing} gave no result within {timeout_s:.0f} s")
    return dead


def _raise_errors(results: mp.Queue, errors: dict[int, str], num_pending: int,
                  world_size: int) -> None:
    """Give the other ranks a moment to report too, then raise with every error, the first
    reported (most likely the cause) first."""
    deadline = time.monotonic() + 2.0
    while len(errors) < num_pending and time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if status == "error":
            errors[rank] = payload
    text = "\n".join(f"rank {rank} of {world_size} raised:\n{tb}" for rank, tb in errors.items())
    raise WorkerError(text)
