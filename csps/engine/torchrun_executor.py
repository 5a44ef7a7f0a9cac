"""The SP x TP world launched by torchrun instead of spawned by the engine:

    torchrun --nproc-per-node=N -m csps.server MODEL -sp P -tp T   (N ranks per node, P*T in all)

Every rank runs `csps serve`. Global rank 0 builds the engine and the HTTP server and drives the
world through a TorchrunExecutor, which holds rank 0's own Worker in-process (run in a thread,
so that the engine goes on while it computes); every other rank runs run_torchrun_worker
(torchrun_worker.py): it receives the worker kwargs rank 0 broadcasts (so only rank 0 plans
the KV cache), builds its Worker, then runs each call rank 0 posts to it and posts the result
back (parallel/mailbox.py), until a stop message. A step goes only to its instances' ranks, so
steps on disjoint ranks run at once, as with spawned workers. A rank whose call raises posts
its error to the rendezvous store and exits; rank 0, polling for replies, sees it and raises a
WorkerError; every later call raises it at once. torchrun's agent then stops the remaining
ranks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

from csps.contract.step import RunnerOutput, SchedulerOutput, Step
from csps.engine.errors import WorkerError
from csps.engine.step_runs import StepRuns
from csps.engine.torchrun_worker import (  # noqa: F401 - run_torchrun_worker: the cli's
    DEAD_AFTER_S,
    REPLY_TIMEOUT_S,
    join_world,
    run_call,
    run_torchrun_worker,
)
from csps.engine.worker import Worker
from csps.engine.worker_proc import STOP, WORKER_METHODS, error_payload
from csps.parallel.comm import CommStats
from csps.parallel.control import (
    broadcast_object,
    gather_objects,
    post_error,
    posted_errors,
)
from csps.parallel.groups import destroy_parallel_groups
from csps.parallel.mailbox import Mailbox

logger = logging.getLogger(__name__)

POLL_S = 0.0005  # between looks for replies while steps are in flight


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or with its variables set by hand)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(v in env for v in ("RANK", "WORLD_SIZE",
                                                                  "MASTER_ADDR"))


def torchrun_rank() -> int:
    return int(os.environ.get("RANK", "0"))


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
        self._mail: Mailbox | None = None  # set once every rank is ready
        self._runs = StepRuns(self.world_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csps-rank0-worker")
        self._local: Future | None = None  # rank 0's own share of the call or step in flight
        self._control_booked = 0
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (beat count, when it changed)
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
        self._mail = Mailbox(self._stats)  # from now on: point-to-point calls (mailbox.py)

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Each request is sampled by its leader's ranks: merge what every rank returns."""
        before = self._stats.bytes_sent["control"]
        merged = RunnerOutput.merge(self.call("execute_model", scheduler_output))
        control = self._stats.bytes_sent["control"] - before
        merged.comm_bytes["control"] = merged.comm_bytes.get("control", 0) + control
        return merged

    def submit(self, step: Step) -> None:
        """Start a step on its instances' ranks and return: rank 0's own worker runs its share
        in a thread, the others get the step in their mail. Steps on disjoint ranks overlap."""
        self.check_health()
        tp = self.groups.tp_size
        ranks = [s * tp + t for s in step.instances for t in range(tp)]
        self._runs.start(step, ranks)
        for rank in ranks:
            if rank == 0:
                self._local = self._pool.submit(run_call, self.worker, self.groups,
                                                "execute_step", (step,))
            else:
                self._mail.post_call(rank, ("execute_step", (step,)))

    def wait_steps(self, timeout_s: float | None = None, wake=None
                   ) -> list[tuple[Step, RunnerOutput]]:
        """Block until at least one step in flight has finished on all its ranks; every step
        finished by then, merged (the control bytes since the last wait go to the first).
        NOTE: `wake` is not waited on here (the replies come through the store): a request
        that arrives meanwhile is scheduled when a step ends."""
        done: list[tuple[Step, RunnerOutput]] = []
        while self._runs.in_flight and not done:
            for rank, result in self._replies_in(self._runs.busy_ranks, timeout_s):
                done += self._runs.finish(rank, result)
        if done:
            control = self._stats.bytes_sent["control"] - self._control_booked
            self._control_booked += control
            out = done[0][1]
            out.comm_bytes["control"] = out.comm_bytes.get("control", 0) + control
        return done

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run worker.method(*args) on every rank; the results in rank order. Not while steps
        are in flight (every rank takes part)."""
        self.check_health()
        if method not in WORKER_METHODS:
            raise ValueError(f"{method!r} is not a remotely callable worker method "
                             f"(allowed: {sorted(WORKER_METHODS)})")
        if self._runs.in_flight:
            raise RuntimeError(f"call({method!r}) while steps are in flight")
        for rank in range(1, self.world_size):
            self._mail.post_call(rank, (method, args))
        self._local = self._pool.submit(run_call, self.worker, self.groups, method, args)
        results: dict[int, Any] = {}
        while len(results) < self.world_size:
            results.update(self._replies_in([r for r in range(self.world_size)
                                             if r not in results], None))
        return [results[r] for r in range(self.world_size)]

    def _replies_in(self, ranks: list[int], timeout_s: float | None) -> list[tuple[int, Any]]:
        """The replies of `ranks` that arrive first (polling: rank 0's thread and the mail);
        raises WorkerError when a rank posted an error or none answers within timeout_s."""
        limit_s = REPLY_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit_s
        next_error_check = 0.0
        while True:
            got = []
            for rank in ranks:
                if rank == 0:
                    if self._local is not None and self._local.done():
                        future, self._local = self._local, None
                        try:
                            got.append((0, future.result()))
                        except Exception as exc:  # noqa: BLE001 - rank 0's own worker
                            post_error(error_payload(exc))
                            self._fail(exc)
                else:
                    arrived, reply = self._mail.poll_reply(rank)
                    if arrived:
                        got.append((rank, reply))
            if got:
                return got
            now = time.monotonic()
            if now >= next_error_check:
                if posted_errors():
                    self._fail(RuntimeError("a rank failed"))
                # NOTE: every rank, not only those in flight: one dead rank breaks the world
                silent = self._silent_ranks(list(range(1, self.world_size)), now)
                if silent:
                    self._fail(RuntimeError(f"worker ranks {silent} died (no heartbeat for "
                                            f"{DEAD_AFTER_S:g} s)"))
                next_error_check = now + 0.2
            if now > deadline:
                self._fail(TimeoutError(f"ranks {ranks} did not answer within {limit_s:g} s"))
            time.sleep(POLL_S)

    def _silent_ranks(self, ranks: list[int], now: float) -> list[int]:
        """Ranks whose heartbeat has not advanced for DEAD_AFTER_S (killed, or the host gone)."""
        silent = []
        for rank in ranks:
            count = self._mail.beats(rank)
            seen, since = self._beats.get(rank, (-1, now))
            if count != seen:
                self._beats[rank] = (count, now)
            elif now - since > DEAD_AFTER_S:
                silent.append(rank)
        return silent

    def check_health(self) -> None:
        """Raise WorkerError if the world failed; also looks for ranks that stopped beating
        (so /health notices a killed rank while idle)."""
        failure = self._failure
        if failure is not None:
            raise WorkerError(f"the workers are stopped: {failure}", rank=failure.rank,
                              remote_traceback=failure.remote_traceback)
        if self._mail is not None:
            silent = self._silent_ranks(list(range(1, self.world_size)), time.monotonic())
            if silent:
                self._fail(RuntimeError(f"worker ranks {silent} died (no heartbeat for "
                                        f"{DEAD_AFTER_S:g} s)"))

    def shutdown(self) -> None:
        with self._lock:
            if self._failure is not None:  # stopped, or a rank is gone or stuck
                return
            self._failure = WorkerError("the executor was shut down", rank=0)
        try:
            for rank in range(1, self.world_size):
                self._mail.post_call(rank, (STOP, ()))
            self._pool.shutdown(wait=False)
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
