"""The worker process: joins the SP x TP world, builds one rank's Worker, then serves the
executor's calls over its pipe until told to stop, a call raises, or the engine goes away.

Pipe messages are pickled tuples. Down: (method, args). Up: ("ready", None) once loaded, then
("ok", result) per call or ("error", (type name,
message, traceback text)), after which the worker exits: its peers may be stuck in a collective,
so the executor tears the whole world down.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from csps.engine.worker import Worker
from csps.parallel.groups import destroy_parallel_groups, init_parallel_groups

# Worker methods the executor may call. Add a name here to expose a method; nothing else runs.
WORKER_METHODS = frozenset({"execute_model", "execute_step"})
STOP = "stop"  # the executor's shutdown message; not a Worker method


def error_payload(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback text) of the exception being handled."""
    return type(exc).__name__, str(exc), traceback.format_exc()


def send(conn: Connection, message: tuple | bytes) -> bool:
    """Send a message (pickled here unless already bytes); False when the engine is gone."""
    try:
        conn.send_bytes(message if isinstance(message, bytes) else pickle.dumps(message))
    except OSError:
        return False
    return True


def run_worker(conn: Connection, rank: int, world_size: int, port: int, sp_size: int,
               tp_size: int, worker_kwargs: dict[str, Any]) -> None:
    """Process entry (spawned by MultiProcExecutor). Sets the torchrun variables first, so the
    rest reads only the environment and runs unchanged under torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # NOTE: Ctrl-C reaches the whole process group; the engine, not each worker, decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        groups = init_parallel_groups(sp_size, tp_size)
        worker = Worker(**worker_kwargs, groups=groups)
    except Exception as exc:
        send(conn, ("error", error_payload(exc)))
        return
    if send(conn, ("ready", None)) and serve(conn, worker):
        destroy_parallel_groups()


def serve(conn: Connection, worker: Worker) -> bool:
    """Answer calls until STOP (returns True), a failed call or the engine's exit (False)."""
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except EOFError:  # the engine process is gone: nobody to answer
            return False
        if method == STOP:
            return True
        try:
            if method not in WORKER_METHODS:
                raise ValueError(f"worker method {method!r} is not callable remotely")
            result = getattr(worker, method)(*args)
            # NOTE: pickled here so that an unpicklable result fails as this call's error
            reply = pickle.dumps(("ok", result))
        except Exception as exc:
            send(conn, ("error", error_payload(exc)))
            return False
        if not send(conn, reply):
            return False
