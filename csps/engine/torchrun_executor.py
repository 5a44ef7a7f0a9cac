"""The SP x TP world launched by torchrun instead of spawned by the engine:

    torchrun --nproc-per-node=N -m csps.server MODEL -sp P -tp T   (N ranks per node, P*T in all)

Every rank runs `csps serve`. Global rank 0 builds the engine and the HTTP server and drives the
world through a TorchrunExecutor, which holds rank 0's own Worker in-process; every other rank
runs run_torchrun_worker: it receives the worker kwargs rank 0 computed (so only rank 0 plans
the KV cache), builds its Worker, then runs each call rank 0 broadcasts and sends the result
back (parallel/control.py), until a stop message. A rank whose call raises posts its error to
the rendezvous store and exits, which breaks its connections: rank 0's pending collective
raises and becomes a WorkerError; every later call raises it at once. torchrun's agent then
stops the remaining ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, NoReturn

import torch

from csps.config import EngineConfig
from csps.engine.errors import WorkerError
from csps.engine.worker import Worker
from csps.engine.worker_proc import STOP, WORKER_METHODS, error_payload
from csps.parallel.comm import CommStats
from csps.parallel.control import (
    broadcast_object,
    gather_objects,
    new_control_group,
    post_error,
    posted_errors,
)
from csps.parallel.groups import destroy_parallel_groups, init_parallel_groups
from csps.scheduler.output import RunnerOutput, SchedulerOutput, Step

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 365 * 86400.0  # the ranks wait for rank 0's next call while the server idles
REPLY_TIMEOUT_S = 600.0  # a rank alive but silent this long after a call (or model load) fails


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or with its variables set by hand)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(v in env for v in ("RANK", "WORLD_SIZE",
                                                                  "MASTER_ADDR"))


def torchrun_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def join_world(sp_size: int, tp_size: int):
    """Join torchrun's world: (ParallelGroups, call group, reply group). ValueError when
    WORLD_SIZE is not sp_size * tp_size. Collective: every rank calls it the same way."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != sp_size * tp_size:
        raise ValueError(f"torchrun started {world_size} ranks (WORLD_SIZE) but -sp {sp_size} "
                         f"x -tp {tp_size} needs {sp_size * tp_size}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    groups = init_parallel_groups(sp_size, tp_size)
    return groups, new_control_group(IDLE_TIMEOUT_S), new_control_group(REPLY_TIMEOUT_S)


class TorchrunExecutor:
    """Rank 0's side: its own Worker here, the other ranks reached through control messages."""

    def __init__(self, worker_kwargs: dict[str, Any], sp_size: int, tp_size: int) -> None:
        if torchrun_rank() != 0:
            raise RuntimeError("only global rank 0 builds the engine; the other ranks run "
                               "run_torchrun_worker")
        self._failure: WorkerError | None = None  # the first failure; every later call raises
        self._lock = threading.Lock()
        self._stats = CommStats()  # control traffic, added to each RunnerOutput
        self.groups, self._calls, self._replies = join_world(sp_size, tp_size)
        self.world_size = self.groups.world_size
        self.worker: Worker | None = None
        self._done: list[tuple[Step, RunnerOutput]] = []
        try:
            broadcast_object(worker_kwargs, self._calls)
        except Exception as exc:
            self._fail(exc)
        self.worker = Worker(**worker_kwargs, groups=self.groups)
        try:
            gather_objects("ready", self._replies)
        except Exception as exc:
            errors = posted_errors()
            if any(payload[0] == "ValueError" for payload in errors.values()):
                raise ValueError("; ".join(p[1] for p in errors.values())) from exc
            self._fail(exc)

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Each request is sampled by its leader's ranks: merge what every rank returns."""
        before = self._stats.bytes_sent["control"]
        merged = RunnerOutput.merge(self.call("execute_model", scheduler_output))
        control = self._stats.bytes_sent["control"] - before
        merged.comm_bytes["control"] = merged.comm_bytes.get("control", 0) + control
        return merged

    def submit(self, step: Step) -> None:
        """Run a step now: every rank takes the broadcast, those outside its instances answer
        an empty output. NOTE: one step at a time (the control messages are broadcasts to
        every rank); the spawned-worker executor runs steps on disjoint instances at once."""
        before = self._stats.bytes_sent["control"]
        merged = RunnerOutput.merge(self.call("execute_step", step))
        control = self._stats.bytes_sent["control"] - before
        merged.comm_bytes["control"] = merged.comm_bytes.get("control", 0) + control
        self._done.append((step, merged))

    def wait_steps(self, timeout_s: float | None = None) -> list[tuple[Step, RunnerOutput]]:
        done, self._done = self._done, []
        return done

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run worker.method(*args) on every rank; the results in rank order."""
        self.check_health()
        if method not in WORKER_METHODS:
            raise ValueError(f"{method!r} is not a remotely callable worker method "
                             f"(allowed: {sorted(WORKER_METHODS)})")
        try:
            broadcast_object((method, args), self._calls, self._stats)
            result = run_call(self.worker, self.groups, method, args)
            return gather_objects(result, self._replies, self._stats)
        except Exception as exc:
            self._fail(exc)

    def check_health(self) -> None:
        failure = self._failure
        if failure is not None:
            raise WorkerError(f"the workers are stopped: {failure}", rank=failure.rank,
                              remote_traceback=failure.remote_traceback)

    def shutdown(self) -> None:
        with self._lock:
            if self._failure is not None:  # stopped, or a rank is gone or stuck
                return
            self._failure = WorkerError("the executor was shut down", rank=0)
        try:
            broadcast_object((STOP, ()), self._calls)
            destroy_parallel_groups()
        except Exception:  # noqa: BLE001 - shutdown never raises
            logger.warning("the torchrun workers did not all take the stop message")
        self.worker = None

    def _fail(self, exc: Exception) -> NoReturn:
        """Remember the failure, naming the ranks that posted theirs, and raise it."""
        errors = posted_errors()
        parts = [f"worker rank {r} raised {p[0]}: {p[1]}" for r, p in sorted(errors.items())]
        parts.append(f"the call failed on rank 0 ({type(exc).__name__}: {exc})")
        first = min(errors, default=0)
        error = WorkerError("; ".join(parts), rank=first,
                            remote_traceback=errors[first][2] if errors else None)
        with self._lock:
            self._failure = self._failure or error
        raise error from exc


def local_worker_kwargs(worker_kwargs: dict[str, Any], config: EngineConfig) -> dict[str, Any]:
    """Rank 0's kwargs, with the model folder found on this node when rank 0's path is not."""
    if not Path(worker_kwargs["model_dir"]).is_dir():
        from csps.model.resolve import resolve_model

        worker_kwargs = {**worker_kwargs, "model_dir": resolve_model(config.model.model)}
    return worker_kwargs


def run_call(worker: Worker, groups, method: str, args: tuple) -> Any:
    """worker.method(*args); a step whose instances leave this rank out gets an empty output."""
    if method == "execute_step" and groups.sp_rank not in args[0].instances:
        return RunnerOutput()
    return getattr(worker, method)(*args)


def run_torchrun_worker(config: EngineConfig) -> int:
    """A rank other than 0: serve rank 0's calls until it stops us (returns 0). On an error the
    rank posts it, prints it and exits with status 1 at once: its peers may be stuck in a
    collective with it, and only its exit breaks them out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # NOTE: Ctrl-C is rank 0's (or torchrun's)
    parallel = config.parallel
    groups, calls, replies = join_world(parallel.sequence_parallel_size,
                                        parallel.tensor_parallel_size)
    try:
        worker_kwargs = local_worker_kwargs(broadcast_object(None, calls), config)
        worker = Worker(**worker_kwargs, groups=groups)
        gather_objects("ready", replies)
        logger.info("rank %d of %d ready", groups.rank, groups.world_size)
        while True:
            method, args = broadcast_object(None, calls)
            if method == STOP:
                break
            if method not in WORKER_METHODS:
                raise ValueError(f"worker method {method!r} is not callable remotely")
            gather_objects(run_call(worker, groups, method, args), replies)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, then this rank exits
        post_error(error_payload(exc))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # NOTE: not sys.exit: tearing the broken groups down could block
    destroy_parallel_groups()
    return 0
