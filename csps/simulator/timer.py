"""How long a simulated iteration takes: SchedulerOutput -> StepCost, through the cost-model
interface (costmodel/work.py counts each rank's work, SP prefills on sub-groups included; a
CostModel prices it). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from csps.contract.step import SchedulerOutput
from csps.costmodel.work import iteration_work

if TYPE_CHECKING:
    from csps.config import ParallelConfig
    from csps.costmodel.base import CostModel
    from csps.costmodel.shape import ModelShape


@dataclass(frozen=True, slots=True)
class StepCost:
    seconds: float  # the iteration's duration
    rank_seconds: tuple[float, ...] = ()  # each SP rank's own time (its busy share)
    comm_bytes: dict[str, int] | None = None  # phase -> bytes sent, summed over ranks

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"a step must take positive time, got {self.seconds}")
        if self.comm_bytes is None:
            object.__setattr__(self, "comm_bytes", {})


class StepTimer(Protocol):
    def __call__(self, output: SchedulerOutput) -> StepCost: ...


class CostModelTimer:
    """Prices iterations with a CostModel. Under TP the works are TP member 0 of each SP rank
    (members do equal work); bytes are scaled up to all TP members."""

    def __init__(self, cost_model: CostModel, shape: ModelShape, parallel: ParallelConfig,
                 block_size: int) -> None:
        self.cost_model = cost_model
        self.shape = shape
        self.parallel = parallel
        self.block_size = block_size

    def __call__(self, output: SchedulerOutput) -> StepCost:
        works = iteration_work(output, self.shape, self.parallel, self.block_size)
        rank_time = self.cost_model.rank_time
        comm: dict[str, int] = {}
        tp = self.parallel.tensor_parallel_size
        for work in works:
            for phase, num_bytes in work.comm_bytes.items():
                comm[phase] = comm.get(phase, 0) + num_bytes * tp
        return StepCost(self.cost_model.iteration_time(works),
                        tuple(rank_time(w) for w in works), comm)


class ConstantTimer:
    """Every iteration takes `seconds` (tests, and reasoning about the scheduler alone)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, output: SchedulerOutput) -> StepCost:
        return StepCost(self.seconds)
