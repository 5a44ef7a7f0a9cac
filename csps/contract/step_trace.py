"""The step trace: one JSON line per executed step, written alike by the engine (measured wall
times) and the simulator (simulated times), so a real run's steps can be priced by the cost
model one by one and set beside a replay's (benchmarks/step_trace_compare.py). Pure Python.

A line holds the step's id, instances, start and end (seconds from the trace's origin: the
engine's start, or simulated time 0) and each scheduled request as the cost model reads it:
token and block counts instead of ids, no sampling state; a step's KV moves, if any, as
(request, source rank, destination rank, positions, block count). `read_step_trace` rebuilds the
steps' SchedulerOutputs from those lines (placeholder token and block ids of the right counts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from csps.contract.csa_config import CsaConfig
from csps.contract.sp_attention import SpAttention
from csps.contract.step import KvMove, ScheduledRequest, SchedulerOutput, Step
from csps.contract.token_range import TokenRange
from csps.request import SamplingParams


@dataclass(frozen=True)
class TracedStep:
    """One line of a step trace, read back."""

    step_id: int
    instances: tuple[int, ...]
    start_s: float
    end_s: float
    scheduler_output: SchedulerOutput
    replica: int = 0  # the simulator's replica (an engine is one)

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


def _request_line(r: ScheduledRequest) -> dict:
    attention = r.sp_attention
    return {"id": r.request_id, "computed": r.num_computed_tokens, "tokens": len(r.token_ids),
            "blocks": len(r.block_ids), "sample": r.do_sample, "leader": r.leader,
            "kv": [[t.rank, t.start, t.end, len(t.block_ids)] for t in r.kv_ranges],
            "chunks": None if r.sp_chunk_lens is None else list(r.sp_chunk_lens),
            "attention": None if attention is None else {
                "algorithm": attention.algorithm,
                "csa": None if attention.csa is None else {
                    "levels": [list(level) for level in attention.csa.levels],
                    "far_queries": attention.csa.far_queries,
                    "micro_batch_heads": attention.csa.micro_batch_heads,
                    "micro_batch_tokens": attention.csa.micro_batch_tokens}}}


def _request_from(line: dict) -> ScheduledRequest:
    attention = line["attention"]
    if attention is not None:
        csa = attention["csa"]
        attention = SpAttention(attention["algorithm"], None if csa is None else CsaConfig(
            tuple(tuple(level) for level in csa["levels"]), csa["far_queries"],
            csa["micro_batch_heads"], csa["micro_batch_tokens"]))
    return ScheduledRequest(
        line["id"], [0] * line["tokens"], line["computed"], [0] * line["blocks"],
        SamplingParams(), line["sample"],
        kv_ranges=tuple(TokenRange(rank, start, end, (0,) * blocks)
                        for rank, start, end, blocks in line["kv"]),
        leader=line["leader"],
        sp_chunk_lens=None if line["chunks"] is None else tuple(line["chunks"]),
        sp_attention=attention)


def _move_from(move: list) -> KvMove:
    request_id, src, dst, start, end, blocks = move
    return KvMove(request_id, TokenRange(src, start, end, (0,) * blocks),
                  TokenRange(dst, start, end, (0,) * blocks))


class StepTraceWriter:
    """Appends a line per finished step: `started(step, t)` when it is launched, `finished(step,
    t)` when its output is booked; t in seconds from any fixed origin."""

    def __init__(self, path: str | Path) -> None:
        self._file: TextIO = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._starts: dict[tuple[int, int], float] = {}  # (replica, step id) -> start

    def started(self, step: Step, at_s: float, replica: int = 0) -> None:
        self._starts[(replica, step.step_id)] = at_s

    def finished(self, step: Step, at_s: float, replica: int = 0) -> None:
        start = self._starts.pop((replica, step.step_id), at_s)
        output = step.scheduler_output
        line = {"step": step.step_id, "replica": replica, "instances": list(step.instances),
                "start_s": start, "end_s": at_s, "iteration": output.iteration,
                "requests": [_request_line(r) for r in output.scheduled_requests]}
        if output.kv_moves:  # [id, src rank, dst rank, start, end, blocks] per move
            line["moves"] = [[m.request_id, m.src.rank, m.dst.rank, m.src.start, m.src.end,
                              len(m.src.block_ids)] for m in output.kv_moves]
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_step_trace(path: str | Path) -> list[TracedStep]:
    """The trace's steps in the order they finished."""
    steps = []
    for text in Path(path).read_text(encoding="utf-8").splitlines():
        if not text.strip():
            continue
        line = json.loads(text)
        output = SchedulerOutput(line["iteration"],
                                 [_request_from(r) for r in line["requests"]],
                                 kv_moves=[_move_from(m) for m in line.get("moves", ())])
        steps.append(TracedStep(line["step"], tuple(line["instances"]), line["start_s"],
                                line["end_s"], output, line.get("replica", 0)))
    return steps
