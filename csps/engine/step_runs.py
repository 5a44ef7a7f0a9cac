"""StepRuns: the executor's books of steps in flight: which ranks run which step, and the
outputs gathered so far. A step is done when every one of its ranks has answered; its
RunnerOutput is the merge of theirs. No torch, no processes: the executors own those."""

from __future__ import annotations

from csps.contract.step import RunnerOutput, Step


class StepRuns:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._rank_step: dict[int, int] = {}  # rank -> the step id it runs
        self._steps: dict[int, tuple[Step, set[int], list[RunnerOutput]]] = {}

    @property
    def in_flight(self) -> bool:
        return bool(self._steps)

    @property
    def busy_ranks(self) -> list[int]:
        return sorted(self._rank_step)

    def start(self, step: Step, ranks: list[int]) -> None:
        """Book a step on `ranks`. ValueError if one of them is still running another step
        (the scheduler never does this: an instance runs one step at a time)."""
        clash = [r for r in ranks if r in self._rank_step]
        if clash or not ranks or any(not 0 <= r < self.world_size for r in ranks):
            raise ValueError(f"step {step.step_id} on ranks {ranks}: ranks {clash} are busy "
                             f"or out of range")
        self._steps[step.step_id] = (step, set(ranks), [])
        for rank in ranks:
            self._rank_step[rank] = step.step_id

    def finish(self, rank: int, output: RunnerOutput) -> list[tuple[Step, RunnerOutput]]:
        """A rank's answer; the step with its merged output once all its ranks answered."""
        step_id = self._rank_step.pop(rank)
        step, pending, outputs = self._steps[step_id]
        pending.discard(rank)
        outputs.append(output)
        if pending:
            return []
        del self._steps[step_id]
        return [(step, RunnerOutput.merge(outputs))]
