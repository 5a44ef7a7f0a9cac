"""The discrete-event loop of `csps simulate`: the real Scheduler and policies, simulated time.

Events are request arrivals and step ends, kept in one heap by time. At each event time the loop
first ends the steps due (the scheduler books their outputs: one fabricated token per sampling
request, so a request stops only at its max_tokens or max_model_len), then hands arrivals to a
replica (an SP x TP group with its own Scheduler; routing.py: least unfinished requests first,
or by prefix), then asks every replica with free instances and work for new steps
(`scheduler.schedule_steps()`, the engine's call): each is priced by a StepTimer and ends that
many seconds later, so every instance runs on its own clock and steps on disjoint instances
overlap. Only time is simulated; every decision is the scheduler's own.
Under `max_concurrency` an arrival waits until fewer requests are in flight (vLLM's client).
A request's prompt ids are built when it is sent (prompt_tokens.py: shared where its Mooncake
hash ids are, unique elsewhere), so the prefix cache reuses what the trace says it may. No torch.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from csps.bench.traces import MOONCAKE_BLOCK_TOKENS
from csps.contract.step import SchedulerOutput, Step
from csps.contract.step_trace import StepTraceWriter
from csps.request import Request, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler
from csps.simulator.prompt_tokens import prompt_token_ids
from csps.simulator.routing import Router
from csps.simulator.timer import StepCost, StepTimer

STEP_END, ARRIVAL = 0, 1  # at equal times, steps end before new requests arrive
FAKE_TOKEN = 0  # every sampled token; requests have no EOS, so only length limits stop them


@dataclass(slots=True)
class RequestRecord:
    """One request's simulated life, times in seconds from the start of the workload."""

    request_id: str
    input_len: int
    output_len: int  # max_tokens asked for
    arrival_s: float  # when the workload sends it
    send_s: float | None = None  # when it reached a scheduler (later under max_concurrency)
    first_scheduled_s: float | None = None  # start of the first iteration that ran its tokens
    token_times: list[float] = field(default_factory=list)  # one per generated token
    finish_s: float | None = None
    error: str = ""
    hash_ids: tuple[int, ...] = ()  # Mooncake prefix blocks: equal leading ids, shared tokens
    cached_tokens: int | None = None  # prompt tokens its first admission found in the cache


@dataclass
class ReplicaStats:
    iterations: int = 0
    busy_s: float = 0.0  # seconds with a step running
    rank_busy_s: list[float] = field(default_factory=list)  # per SP rank: its own work
    comm_bytes: dict[str, int] = field(default_factory=dict)  # phase -> bytes, all ranks
    iterations_by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, output: SchedulerOutput, cost: StepCost) -> None:
        self.iterations += 1
        self.busy_s += cost.seconds
        if len(self.rank_busy_s) < len(cost.rank_seconds):
            self.rank_busy_s += [0.0] * (len(cost.rank_seconds) - len(self.rank_busy_s))
        for rank, seconds in enumerate(cost.rank_seconds):
            self.rank_busy_s[rank] += seconds
        for phase, num_bytes in cost.comm_bytes.items():
            self.comm_bytes[phase] = self.comm_bytes.get(phase, 0) + num_bytes
        kind = iteration_kind(output)
        self.iterations_by_kind[kind] = self.iterations_by_kind.get(kind, 0) + 1


def iteration_kind(output: SchedulerOutput) -> str:
    """'sp_prefill', 'decode', 'prefill' (chunks only) or 'mixed'."""
    requests = output.scheduled_requests
    if any(r.sp_chunk_lens is not None for r in requests):
        return "sp_prefill"
    decodes = sum(1 for r in requests if r.is_decode)
    return "decode" if decodes == len(requests) else "prefill" if not decodes else "mixed"


class Simulator:
    def __init__(self, schedulers: Sequence[Scheduler], timer: StepTimer,
                 max_concurrency: int | None = None,
                 on_request_done: Callable[[RequestRecord], None] | None = None,
                 hash_block_tokens: int = MOONCAKE_BLOCK_TOKENS,
                 routing: str = "least-loaded") -> None:
        if not schedulers:
            raise ValueError("need at least one scheduler (replica)")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if hash_block_tokens < 1:
            raise ValueError(f"hash_block_tokens must be >= 1, got {hash_block_tokens}")
        self.schedulers = list(schedulers)
        self.timer = timer
        self.max_concurrency = max_concurrency
        self.on_request_done = on_request_done
        self.hash_block_tokens = hash_block_tokens  # prompt tokens per hash id
        self.router = Router(routing)
        self.stats = [ReplicaStats() for _ in self.schedulers]
        self.clock = 0.0
        self.wall_s = 0.0  # real seconds the last run took
        self._in_flight: dict[int, tuple[int, Step]] = {}  # event seq -> (replica, step)
        self._events: list[tuple[float, int, int, int]] = []  # (time, kind, seq, index)
        self._seq = 0
        self._records: list[RequestRecord] = []
        self._live: dict[str, RequestRecord] = {}  # sent and not finished
        self._requests: dict[str, Request] = {}  # the scheduler's Request of each live one
        self._backlog: deque[int] = deque()  # arrived, waiting for a concurrency slot
        # Replicas where something changed (a step ended, a request arrived) and that have
        # unfinished requests: the only ones a new step can start on.
        self._ready: set[int] = set()
        self.step_trace: StepTraceWriter | None = None  # --step-trace: a line per step
        # True: an arrival starts steps on free instances at once (the engine since its
        # Wakeup). False: only on a replica with no step in flight, as the engine did before
        # (and the torchrun executor still does); for replaying such runs.
        self.arrival_starts_steps = True

    def run(self, records: Sequence[RequestRecord]) -> list[RequestRecord]:
        """Simulate the requests to completion; returns the records, filled in, in order."""
        start = time.perf_counter()
        self._records = list(records)
        for index, record in enumerate(self._records):
            self._push(record.arrival_s, ARRIVAL, index)
        while self._events:
            now = self._events[0][0]
            self.clock = now
            while self._events and self._events[0][0] == now:
                _, kind, seq, index = heapq.heappop(self._events)
                if kind == STEP_END:
                    self._end_step(seq, now)
                else:
                    self._backlog.append(index)
            self._send_backlog(now)
            for replica in sorted(self._ready):
                self._start_step(replica, now)
        stuck = [r.request_id for r in self._live.values()]
        if stuck:
            raise RuntimeError(f"{len(stuck)} requests can never be scheduled "
                               f"(first: {stuck[0]}); the policy returned empty iterations")
        self.wall_s = time.perf_counter() - start
        return self._records

    def _push(self, at: float, kind: int, index: int) -> int:
        heapq.heappush(self._events, (at, kind, self._seq, index))
        self._seq += 1
        return self._seq - 1

    def _send_backlog(self, now: float) -> None:
        while self._backlog and (self.max_concurrency is None
                                 or len(self._live) < self.max_concurrency):
            index = self._backlog.popleft()
            record = self._records[index]
            record.send_s = now
            replica = self.router.route(record.hash_ids, self.schedulers)
            scheduler = self.schedulers[replica]
            if record.input_len >= scheduler.max_model_len:
                self._fail(record, now, f"prompt of {record.input_len} tokens does not fit "
                                        f"max_model_len={scheduler.max_model_len}")
                continue
            max_tokens = min(record.output_len, scheduler.max_model_len - record.input_len)
            prompt = prompt_token_ids(index, record.input_len, record.hash_ids,
                                      self.hash_block_tokens)
            request = Request(record.request_id, prompt,
                              SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                             ignore_eos=True),
                              eos_token_id=None, arrival_time=now, max_tokens=max_tokens)
            try:
                scheduler.add_request(request)
            except ValueError as exc:  # e.g. the vllm policy's budget refuses the prompt
                self._fail(record, now, str(exc))
                continue
            self._live[record.request_id] = record
            self._requests[record.request_id] = request
            if self.arrival_starts_steps or not any(
                    r == replica for r, _ in self._in_flight.values()):
                self._ready.add(replica)

    def _fail(self, record: RequestRecord, now: float, error: str) -> None:
        record.error, record.finish_s = error, now
        if self.on_request_done is not None:
            self.on_request_done(record)

    def _start_step(self, replica: int, now: float) -> None:
        scheduler = self.schedulers[replica]
        self._ready.discard(replica)  # until a step ends or a request arrives there
        if not scheduler.has_unfinished_requests():
            return
        for step in scheduler.schedule_steps():
            output = step.scheduler_output
            for scheduled in output.scheduled_requests:
                if scheduled.num_computed_tokens == 0:  # a first chunk (or a recompute's)
                    record = self._live[scheduled.request_id]
                    if record.first_scheduled_s is None:
                        record.first_scheduled_s = now
            cost = self.timer(output)
            self.stats[replica].add(output, cost)
            seq = self._push(now + cost.seconds, STEP_END, replica)
            self._in_flight[seq] = (replica, step)
            if self.step_trace is not None:
                self.step_trace.started(step, now, replica)

    def _end_step(self, seq: int, now: float) -> None:
        replica, step = self._in_flight.pop(seq)
        self._ready.add(replica)
        if self.step_trace is not None:
            self.step_trace.finished(step, now, replica)
        sampled = {r.request_id: FAKE_TOKEN for r in step.scheduler_output.scheduled_requests
                   if r.do_sample}
        for update in self.schedulers[replica].update_from_step(step, RunnerOutput(sampled)):
            record = self._live[update.request.request_id]
            record.token_times.append(now)
            if update.finished:
                record.finish_s = now
                record.cached_tokens = self._requests.pop(record.request_id).num_cached_tokens
                del self._live[record.request_id]
                if self.on_request_done is not None:
                    self.on_request_done(record)
