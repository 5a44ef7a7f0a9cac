"""run_ranks: a benchmark function on `world` spawned gloo ranks, results in rank order.

Each rank gets torchrun's variables for a free local port (so the function joins with
csps.parallel.groups.init_parallel_groups) and one torch thread, and leaves its groups on exit.
A rank that raises, dies or overruns `timeout_s` fails the whole run with a RuntimeError.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from typing import Any

import torch

from csps.parallel.groups import destroy_parallel_groups, find_free_port


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as exc:  # noqa: B036 - the parent must hear of it
        results.put((rank, "error", repr(exc)))
        raise
    finally:
        destroy_parallel_groups()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any,
              timeout_s: float = 7200.0) -> list[Any]:
    """fn(rank, world, *args) on every rank (fn must be picklable: module level)."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), find_free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results), daemon=True)
             for r in range(world)]
    for proc in procs:
        proc.start()
    outputs, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(outputs) < world:
            try:
                rank, status, payload = results.get(timeout=5)
            except queue.Empty:
                if time.monotonic() > deadline or any(p.exitcode for p in procs):
                    raise RuntimeError("a rank died or timed out") from None
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed: {payload}")
            outputs[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [outputs[r] for r in range(world)]
