"""MultiProcExecutor: spawns sp_size * tp_size worker processes and drives them with one verb,
`call(method, *args)`: the same Worker method on every rank, every rank's result back (style.md
example 8); steps go only to their instances' ranks (step_runs.py: several in flight at once). A
worker that raises, dies or stalls stops them all; later calls raise at once."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple, NoReturn

from csps.contract.step import RunnerOutput, SchedulerOutput, Step
from csps.engine.errors import WorkerError
from csps.engine.step_runs import StepRuns
from csps.engine.worker_proc import STOP, WORKER_METHODS, run_worker
from csps.parallel.groups import find_free_port

MAX_PAYLOAD_BYTES = 256 << 20  # largest pickled call; a SchedulerOutput is kilobytes
READY_TIMEOUT_S = 600.0  # spawn + import + model load of every worker
STOP_GRACE_S = 5.0  # how long shutdown waits for workers to leave before killing them
FAILURE_GRACE_S = 0.5  # after a first failure, how long other ranks may still report theirs


class RemoteTraceback(Exception):
    """A worker's traceback text, chained as __cause__ so that logs show where it failed."""

    def __str__(self) -> str:
        return self.args[0]


class Failure(NamedTuple):
    rank: int
    summary: str  # one line: "worker rank 1 raised KeyError: 'x'" / "... died (exit code -9)"
    type_name: str | None = None  # the exception's class name, when the worker raised
    message: str | None = None  # the exception's message, when the worker raised
    traceback: str | None = None  # its traceback text, when the worker raised


def kill_workers(procs: list[mp.Process]) -> None:
    """Terminate, then kill, every live worker (peers of a failed rank may be stuck in a
    collective) and reap them all."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def release_workers(procs: list[mp.Process], conns: list[Connection]) -> None:
    """Ask every worker to stop, give them STOP_GRACE_S, kill the rest, close the pipes."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps((STOP, ())))
        except OSError:  # already gone
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    kill_workers(procs)
    for conn in conns:
        conn.close()


class MultiProcExecutor:
    """sp_size * tp_size spawned worker processes (rank order), one duplex pipe each. Replies
    are awaited on the pipes and the process sentinels together, so a dead rank is seen at once.
    """

    def __init__(self, worker_kwargs: dict[str, Any], sp_size: int, tp_size: int,
                 call_timeout_s: float | None = None,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.world_size = sp_size * tp_size
        self.tp_size = tp_size
        self.call_timeout_s = call_timeout_s  # None: wait as long as the workers live
        self._failure: Failure | None = None  # the first failure; every later call raises
        self._lock = threading.Lock()  # serialises teardown (check_health may run elsewhere)
        self._procs: list[mp.Process] = []
        self._conns: list[Connection] = []
        self._runs = StepRuns(self.world_size)
        self._submitted: dict[int, float] = {}  # step id -> when it was submitted (timeouts)
        # NOTE: a finalizer, not __del__: runs once, on shutdown(), garbage collection or exit.
        self._finalizer = weakref.finalize(self, release_workers, self._procs, self._conns)
        try:
            ctx, port = mp.get_context("spawn"), find_free_port()
            for rank in range(self.world_size):
                conn, child_conn = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=run_worker, name=f"csps-worker-{rank}", daemon=True,
                                   args=(child_conn, rank, self.world_size, port, sp_size,
                                         tp_size, worker_kwargs))
                proc.start()
                child_conn.close()  # NOTE: only the worker holds its end: death reads as EOF
                self._procs.append(proc)
                self._conns.append(conn)
            self._gather("ready", ready_timeout_s)
        except BaseException as exc:
            failure = self._failure
            self.shutdown()
            if failure is not None and failure.type_name == "ValueError":
                raise ValueError(failure.message) from exc  # e.g. a bad model folder
            raise

    @property
    def worker_pids(self) -> list[int | None]:
        return [proc.pid for proc in self._procs]

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Each request is sampled by its leader's ranks: merge what every rank returns."""
        return RunnerOutput.merge(self.call("execute_model", scheduler_output))

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Run worker.method(*args) on every rank; the results in rank order. timeout_s (default
        call_timeout_s) bounds the wait. ValueError for a method off WORKER_METHODS or a payload
        over MAX_PAYLOAD_BYTES (nothing is sent); WorkerError if any rank fails."""
        if self._runs.in_flight:
            raise RuntimeError(f"call {method!r} while steps are in flight; wait for them")
        self._send(range(self.world_size), method, args)
        return self._gather("ok", self.call_timeout_s if timeout_s is None else timeout_s)

    def _send(self, ranks, method: str, args: tuple) -> None:
        self.check_health()
        if method not in WORKER_METHODS:
            raise ValueError(f"{method!r} is not a remotely callable worker method "
                             f"(allowed: {sorted(WORKER_METHODS)})")
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"call {method!r}: {len(payload)} bytes pickled, over the "
                             f"{MAX_PAYLOAD_BYTES}-byte limit")
        for rank in ranks:
            try:
                self._conns[rank].send_bytes(payload)
            except OSError:
                self._fail([self._died(rank)])

    # ---- steps: each to its instances' ranks, several in flight -----------------------------
    def submit(self, step: Step) -> None:
        """Start a step on the ranks of its instances (SP rank s: world ranks s*tp...)."""
        ranks = [s * self.tp_size + t for s in step.instances for t in range(self.tp_size)]
        self._runs.start(step, ranks)
        self._submitted[step.step_id] = time.monotonic()
        self._send(ranks, "execute_step", (step,))

    def wait_steps(self, timeout_s: float | None = None, wake=None
                   ) -> list[tuple[Step, RunnerOutput]]:
        """Block until at least one step in flight has finished on all its ranks, or `wake`
        is set (then possibly with nothing); every step finished by then, with its ranks'
        outputs merged. WorkerError if any rank fails, or a step in flight has run longer
        than the timeout since it was submitted (a wake does not restart that clock)."""
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        done: list[tuple[Step, RunnerOutput]] = []
        while self._runs.in_flight and not done:
            deadline = None if timeout_s is None else min(self._submitted.values()) + timeout_s
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            busy = self._runs.busy_ranks
            woken = [] if wake is None else [wake.waitable]
            ready = set(wait([*(self._conns[r] for r in busy),
                              *(p.sentinel for p in self._procs), *woken], remaining))
            if woken and woken[0] in ready:
                ready.discard(woken[0])
                if not ready:
                    return done  # nothing finished: the engine schedules for the newcomer
            if not ready:
                self._fail([Failure(r, f"worker rank {r} did not answer within "
                                       f"{timeout_s:g} s") for r in busy])
            failures = [self._died(r) for r, p in enumerate(self._procs)
                        if p.sentinel in ready and r not in busy]
            for rank in busy:
                if self._conns[rank] in ready or self._procs[rank].sentinel in ready:
                    status, payload = self._read(rank)
                    if status == "ok":
                        done += self._runs.finish(rank, payload)
                    elif status == "error":
                        type_name, message, text = payload
                        failures.append(Failure(rank, f"worker rank {rank} raised {type_name}: "
                                                      f"{message}", type_name, message, text))
                    else:
                        failures.append(self._died(rank))
            if failures:
                self._fail(failures)
        for step, _ in done:
            self._submitted.pop(step.step_id, None)
        return done

    def check_health(self) -> None:
        failure = self._failure
        if failure is not None:
            raise WorkerError(f"the workers are stopped: {failure.summary}", rank=failure.rank,
                              remote_traceback=failure.traceback)
        dead = [self._died(rank) for rank, proc in enumerate(self._procs)
                if not proc.is_alive()]
        if dead:
            self._fail(dead)

    def shutdown(self) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = Failure(0, "the executor was shut down")
        self._finalizer()

    # ---- replies and failures ---------------------------------------------------------------
    def _gather(self, expected: str, timeout_s: float | None) -> list[Any]:
        """Wait for one `expected` reply per rank, or its process's end; payloads by rank."""
        pending = set(range(self.world_size))
        replies: dict[int, Any] = {}
        failures: list[Failure] = []  # in arrival order
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            if failures:  # NOTE: peers may still report the cause; wait only a moment
                deadline = min(deadline or float("inf"), time.monotonic() + FAILURE_GRACE_S)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = set(wait([*(self._conns[r] for r in pending),
                              *(self._procs[r].sentinel for r in pending)], remaining))
            if not ready:
                failures = failures or [Failure(r, f"worker rank {r} did not answer within "
                                                   f"{timeout_s:g} s") for r in sorted(pending)]
                break
            for rank in sorted(pending):
                if self._conns[rank] in ready or self._procs[rank].sentinel in ready:
                    pending.discard(rank)
                    status, payload = self._read(rank)
                    if status == expected:
                        replies[rank] = payload
                    elif status == "error":
                        type_name, message, text = payload
                        failures.append(Failure(rank, f"worker rank {rank} raised {type_name}: "
                                                      f"{message}", type_name, message, text))
                    elif status == "died":
                        failures.append(self._died(rank))
                    else:
                        failures.append(Failure(rank, f"worker rank {rank} sent {status!r}, "
                                                      f"expected {expected!r}"))
        if failures:
            self._fail(failures)
        return [replies[r] for r in range(self.world_size)]

    def _read(self, rank: int) -> tuple[str, Any]:
        """The rank's next message, or ("died", None) when its process is gone."""
        conn = self._conns[rank]
        try:
            if conn.poll():
                return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            pass
        return "died", None

    def _died(self, rank: int) -> Failure:
        proc = self._procs[rank]
        proc.join(1.0)  # the sentinel can fire just before the exit code is readable
        return Failure(rank, f"worker rank {rank} died (exit code {proc.exitcode})")

    def _fail(self, failures: list[Failure]) -> NoReturn:
        """Stop every worker, remember the failure and raise it. Deaths and timeouts are named
        first: a rank that raised after a peer died most likely reports a broken collective."""
        ordered = sorted(failures, key=lambda f: f.traceback is not None)
        first = ordered[0]
        with self._lock:
            if self._failure is None:
                self._failure = first
            kill_workers(self._procs)  # NOTE: the pipes stay open for a concurrent _gather
        error = WorkerError("; ".join(f.summary for f in ordered), rank=first.rank,
                            remote_traceback=first.traceback)
        if first.traceback is not None:
            raise error from RemoteTraceback(first.traceback)
        raise error
