"""A fake-clock harness for scheduling policies: a linear fake CostModel priced through the real
StepPredictor (csps/costmodel/work.py counts the work), scripted arrivals and aborts, one
sampled token per do_sample request, and the scheduler's invariants checked after every step.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from csps.config import ParallelConfig, SchedulerConfig
from csps.costmodel.base import RankWork
from csps.costmodel.shape import ModelShape
from csps.kvcache.placement import DistributedKVCacheManager
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler
from csps.scheduler.predictor import StepPredictor

BLOCK = 4
SHAPE = ModelShape("tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_kv_heads=2, head_dim=16, vocab_size=256, dtype_bytes=4)


@dataclass(frozen=True)
class FakeCostModel:
    """rank time = per_token*tokens + per_pair*attention pairs + per_kv*decode KV reads +
    per_byte*(bytes not overlappable) + per_collective*collectives; an iteration = the slowest
    rank + per_rank for every rank with work (a group-size cost) + fixed."""

    per_token: float = 1e-3
    per_pair: float = 1e-6
    per_kv: float = 1e-6
    per_byte: float = 0.0
    per_collective: float = 0.0
    per_rank: float = 0.0
    fixed: float = 1e-3
    name: str = "fake"

    def rank_time(self, work: RankWork) -> float:
        return (self.per_token * work.num_tokens + self.per_pair * work.attn_pairs
                + self.per_kv * work.decode_kv_tokens
                + self.per_byte * (work.total_bytes - work.overlappable_bytes)
                + self.per_collective * work.num_collectives)

    def iteration_time(self, works) -> float:
        active = [w for w in works if not w.is_idle]
        return (max((self.rank_time(w) for w in active), default=0.0)
                + self.per_rank * len(active) + self.fixed)



def distinct_prompt(rid: str, prompt_len: int) -> list[int]:
    """Token ids no other request's prompt shares (so the prefix cache never hits by chance)."""
    base = zlib.crc32(rid.encode()) % 100_000 * 10_000
    return list(range(base + 1, base + prompt_len + 1))

def make_predictor(sp_size: int, cost: FakeCostModel | None = None, **parallel) -> StepPredictor:
    return StepPredictor(cost or FakeCostModel(), SHAPE,
                         ParallelConfig(sequence_parallel_size=sp_size, **parallel), BLOCK)


def make_scheduler(policy: str, sp_size: int, predictor: StepPredictor | None,
                   num_blocks: int = 64, max_len: int = 512, degrees=None,
                   **config) -> Scheduler:
    return Scheduler(SchedulerConfig(policy=policy, **config),
                     DistributedKVCacheManager(sp_size, num_blocks, BLOCK), max_len, predictor,
                     degrees, sp_attention=predictor.parallel.sp_attention_choice
                     if predictor is not None else None)


def make_request(rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    return Request(rid, distinct_prompt(rid, prompt_len), SamplingParams(ignore_eos=True),
                   eos_token_id=0, max_tokens=max_tokens)


def step(scheduler: Scheduler):
    """One iteration with a fabricated RunnerOutput; the books are checked afterwards."""
    output = scheduler.schedule()
    sampled = {r.request_id: 7 for r in output.scheduled_requests if r.do_sample}
    scheduler.update_from_output(output, RunnerOutput(sampled))
    scheduler.check_invariants()
    return output


@dataclass
class Trace:
    """What a run did: per iteration (start time, output) and per request first/last token."""

    steps: list = field(default_factory=list)
    first_token_s: dict[str, float] = field(default_factory=dict)
    finished_s: dict[str, float] = field(default_factory=dict)


def run(scheduler: Scheduler, predictor: StepPredictor, arrivals: list[tuple[float, Request]],
        aborts: dict[float, str] | None = None, max_steps: int = 5000) -> Trace:
    """Drive the scheduler on a fake clock: each step lasts predictor.iteration_time(output)."""
    pending, aborts, trace, now = sorted(arrivals, key=lambda a: a[0]), dict(aborts or {}), \
        Trace(), 0.0
    for _ in range(max_steps):
        while pending and pending[0][0] <= now:
            scheduler.add_request(pending.pop(0)[1])
        for when in [t for t in aborts if t <= now]:
            scheduler.abort_requests([aborts.pop(when)])
        if not scheduler.has_unfinished_requests():
            if not pending:
                return trace
            now = pending[0][0]
            continue
        output = step(scheduler)
        trace.steps.append((now, output))
        now += predictor.iteration_time(output)
        for r in output.scheduled_requests:
            if r.do_sample:
                trace.first_token_s.setdefault(r.request_id, now)
                if r.request_id not in scheduler.requests:
                    trace.finished_s[r.request_id] = now
    raise AssertionError("the workload did not finish")
