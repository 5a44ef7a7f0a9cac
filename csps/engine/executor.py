"""Executors: how the engine reaches its workers. UniProcExecutor keeps the one worker in this
process; MultiProcExecutor (multiproc_executor.py) runs one process per SP x TP rank."""

from __future__ import annotations

from typing import Any, Protocol

from csps.config import EngineConfig
from csps.contract.step import RunnerOutput, SchedulerOutput, Step
from csps.engine.worker import Worker


class Executor(Protocol):
    """What the engine needs from its workers. Called from the engine thread; check_health may
    also be called from another thread."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one iteration on every worker and return rank 0's output. Raises WorkerError when
        a worker raised, died or timed out; every later call then raises WorkerError at once."""
        ...

    def submit(self, step: Step) -> None:
        """Start a step on the workers of its instances (at once, or queued: never blocks on
        another step's instances). Raises WorkerError as execute_model does."""
        ...

    def wait_steps(self, timeout_s: float | None = None, wake=None
                   ) -> list[tuple[Step, RunnerOutput]]:
        """Block until at least one submitted step has finished (none in flight: return []);
        every step finished by then with its workers' merged output. `wake` (a Wakeup): also
        return, possibly with nothing, once it is set (a request arrived or was aborted), so
        the engine can start steps on idle instances; executors that run steps to completion
        in submit() may ignore it."""
        ...

    def check_health(self) -> None:
        """Raise WorkerError if a worker has failed or exited. Cheap: no round trip."""
        ...

    def shutdown(self) -> None:
        """Stop and reap every worker. Idempotent; never raises."""
        ...


class UniProcExecutor:
    """Runs the single worker in the engine's own process; its exceptions reach the caller."""

    def __init__(self, **worker_kwargs) -> None:
        self.worker = Worker(**worker_kwargs)
        self._done: list[tuple[Step, RunnerOutput]] = []

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def submit(self, step: Step) -> None:
        self._done.append((step, self.worker.execute_step(step)))

    def wait_steps(self, timeout_s: float | None = None, wake=None
                   ) -> list[tuple[Step, RunnerOutput]]:
        done, self._done = self._done, []  # submit() ran each step: nothing to wait for
        return done

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self.worker = None


def make_executor(config: EngineConfig, worker_kwargs: dict[str, Any]) -> Executor:
    """The torchrun world when torchrun started this process, else one in-process worker for
    world size 1, else one spawned process per SP x TP rank."""
    from csps.engine.torchrun_executor import TorchrunExecutor, launched_by_torchrun

    parallel = config.parallel
    if launched_by_torchrun():
        return TorchrunExecutor(worker_kwargs, parallel.sequence_parallel_size,
                                parallel.tensor_parallel_size)
    if parallel.world_size == 1:
        return UniProcExecutor(**worker_kwargs)
    from csps.engine.multiproc_executor import MultiProcExecutor

    return MultiProcExecutor(worker_kwargs, parallel.sequence_parallel_size,
                             parallel.tensor_parallel_size)
