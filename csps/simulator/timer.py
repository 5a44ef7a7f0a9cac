"""How long a simulated iteration takes: SchedulerOutput -> StepCost, through the cost-model
interface (work.py counts each rank's work; a CostModel prices it). No torch.

`iteration_works` extends work.iteration_work to what only the simulator's policies emit: SP
prefills on sub-groups of ranks (zeros in sp_chunk_lens), several in one iteration or beside
local work, each with its own attention choice (ScheduledRequest.sp_attention / csa_levels /
csa_micro_batch, None = the engine's); counts on one rank add up, as in
scheduler/predictor.py's iteration_time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from csps.costmodel.base import RankWork
from csps.costmodel.work import iteration_work, sp_prefill_work
from csps.scheduler.output import SchedulerOutput

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
        works = iteration_works(output, self.shape, self.parallel, self.block_size)
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


def iteration_works(output: SchedulerOutput, shape: ModelShape, parallel: ParallelConfig,
                    block_size: int) -> list[RankWork]:
    """[sequence_parallel_size] RankWork of one iteration (module docstring)."""
    sp_prefills = [r for r in output.scheduled_requests if r.is_sp_prefill]
    if not sp_prefills:
        return iteration_work(output, shape, parallel, block_size)
    rest = [r for r in output.scheduled_requests if not r.is_sp_prefill]
    works = (iteration_work(SchedulerOutput(output.iteration, rest), shape, parallel, block_size)
             if rest else [RankWork() for _ in range(parallel.sequence_parallel_size)])
    for request in sp_prefills:
        attention = request.sp_attention or parallel.sp_attention
        levels, micro_batch = request.csa_levels, request.csa_micro_batch
        layout = parallel
        if attention == "csa" and micro_batch is not None:
            layout = dataclasses.replace(parallel, csa_micro_batch=micro_batch)
        degree = sum(1 for n in request.sp_chunk_lens if n)
        if attention == "csa" and levels is None:
            levels = (parallel.resolved_csa_levels if degree == parallel.sequence_parallel_size
                      else f"1:1,{degree}:2")
        part = sp_prefill_work(list(request.sp_chunk_lens), shape, layout, attention, levels)
        for work in part:
            work.num_sampled = 0
        part[request.leader].num_sampled = int(request.do_sample)
        works = [_add(a, b) for a, b in zip(works, part, strict=True)]
    return works


def _add(a: RankWork, b: RankWork) -> RankWork:
    """Two works on one rank in one iteration: counts add up."""
    comm = dict(a.comm_bytes)
    for phase, num_bytes in b.comm_bytes.items():
        comm[phase] = comm.get(phase, 0) + num_bytes
    return RankWork(a.num_tokens + b.num_tokens, a.num_seqs + b.num_seqs,
                    a.num_sampled + b.num_sampled, a.attn_pairs + b.attn_pairs,
                    a.decode_kv_tokens + b.decode_kv_tokens, comm,
                    a.num_collectives + b.num_collectives,
                    a.overlappable_bytes + b.overlappable_bytes)
