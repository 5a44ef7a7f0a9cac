"""The contract between deciding and doing: the Step the scheduler sends down (instances and
their SchedulerOutput) and the RunnerOutput that comes back up. Plain dataclasses of ints and
lists, picklable, no torch (style.md section 6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csps.contract.sampling import SamplingContext, TokenLogprobs
from csps.contract.sp_attention import SpAttention
from csps.contract.token_range import TokenRange
from csps.request import SamplingParams  # a request's plain values (request.py imports nothing)

# What workers' traffic is counted by (RunnerOutput.comm_bytes keys; parallel/comm.py).
COMM_PHASES = ("prefill_attn", "decode_attn", "tp", "control", "kv_transfer")


@dataclass
class ScheduledRequest:
    """One request's share of an iteration.

    The worker processes `token_ids` at positions
    [num_computed_tokens, num_computed_tokens + len(token_ids)), writes their K/V into the slots
    given by `block_ids`, attends over positions [0, num_computed_tokens + len(token_ids)), and
    samples one token from the last position when `do_sample` is set.
    """

    request_id: str
    token_ids: list[int]  # the tokens to run this iteration (a prompt chunk, or 1 decode token)
    num_computed_tokens: int  # tokens whose K/V is already in the cache
    block_ids: list[int]  # the request's whole block table, in order
    sampling_params: SamplingParams
    do_sample: bool  # True for the last prefill chunk and for every decode step
    # Sequence parallelism (sp_size > 1; the defaults mean one worker, KV in `block_ids`):
    # where the request's KV lives once this iteration has run, in position order; the SP rank
    # that runs its tokens (dense layers, sampling); and, for an SP prefill, the prompt's
    # chunk length on each SP rank (sum = len(token_ids), chunk r runs on SP rank r; 0 = not
    # in the prefill's group). NOTE: under loongserve an SP prefill's kv_ranges may differ
    # from its chunks (scale-down: a rank keeps KV that passes it in the ring).
    kv_ranges: tuple[TokenRange, ...] = ()
    leader: int = 0
    sp_chunk_lens: tuple[int, ...] | None = None
    # An SP prefill's attention across its chunks, decided whole by the scheduler (the
    # deployment's choice or the sps2 configurator's; CSA levels topped by the group's size).
    # None only when this is not an SP prefill.
    sp_attention: SpAttention | None = None
    # The history the sampler needs (penalties, min_tokens, a grammar, prompt logprobs); None
    # when the request's sampling parameters need none.
    sampling_context: SamplingContext | None = None

    @property
    def is_sp_prefill(self) -> bool:
        return self.sp_chunk_lens is not None

    @property
    def is_distributed(self) -> bool:
        """True when the request's KV spans more than one SP rank."""
        return len({r.rank for r in self.kv_ranges}) > 1

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.do_sample and len(self.token_ids) == 1 and self.num_computed_tokens > 0


@dataclass(frozen=True)
class KvMove:
    """Copy positions [src.start, src.end) of a request's KV from SP rank src.rank's blocks to
    dst.rank's blocks (whole blocks, every layer) once the step's forward has run; the
    scheduler then frees the source blocks (sps2's consolidation after an SP prefill)."""

    request_id: str
    src: TokenRange
    dst: TokenRange

    def __post_init__(self) -> None:
        if (self.src.start, self.src.end) != (self.dst.start, self.dst.end) or (
                self.src.rank == self.dst.rank
                or len(self.src.block_ids) != len(self.dst.block_ids)):
            raise ValueError(f"{self.request_id}: a KV move copies one range's blocks to "
                             f"another rank, got {self.src} -> {self.dst}")


@dataclass
class SchedulerOutput:
    """Everything a worker needs for one iteration. Decode requests come first, then prefills."""

    iteration: int
    scheduled_requests: list[ScheduledRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # drop per-request worker state
    preempted_request_ids: list[str] = field(default_factory=list)
    kv_moves: list[KvMove] = field(default_factory=list)  # run after the forward, in order

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(r.num_scheduled_tokens for r in self.scheduled_requests)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for r in self.scheduled_requests if r.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.total_num_scheduled_tokens - self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled_requests or self.kv_moves)


@dataclass
class RunnerOutput:
    """What the worker returns: one sampled token per request that had `do_sample` set, or, for
    a request whose own work failed (its sampling), the error that ends it alone."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request_id -> error message
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # for the sampled token
    # request_id -> [(position, logprobs of the prompt token at that position)], any order
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprobs]]] = field(default_factory=dict)
    execute_time_s: float = 0.0  # wall time the worker spent on the iteration
    comm_bytes: dict[str, int] = field(default_factory=dict)  # phase -> bytes sent this iteration

    @classmethod
    def merge(cls, outputs: list[RunnerOutput]) -> RunnerOutput:
        """Combine the ranks' outputs: each request is sampled by one rank (its leader); times
        are the slowest rank's; bytes add up over ranks."""
        merged = cls()
        for out in outputs:
            merged.sampled_token_ids.update(out.sampled_token_ids)
            merged.failed.update(out.failed)
            merged.logprobs.update(out.logprobs)
            for request_id, entries in out.prompt_logprobs.items():
                merged.prompt_logprobs.setdefault(request_id, []).extend(entries)
            merged.execute_time_s = max(merged.execute_time_s, out.execute_time_s)
            for phase, num_bytes in out.comm_bytes.items():
                merged.comm_bytes[phase] = merged.comm_bytes.get(phase, 0) + num_bytes
        return merged


@dataclass
class Step:
    """One unit of execution: a contiguous set of SP instances and the SchedulerOutput they run
    together. Steps on disjoint instance sets run concurrently; an instance runs one step at a
    time. Ranks named inside the output (kv_ranges, leader, sp_chunk_lens' index) are global SP
    ranks; every collective of the step runs on the process group of `instances`, and only the
    workers of `instances` receive it."""

    step_id: int
    instances: tuple[int, ...]  # global SP ranks, contiguous and ascending
    scheduler_output: SchedulerOutput

    def __post_init__(self) -> None:
        first = self.instances[0] if self.instances else 0
        if not self.instances or self.instances != tuple(range(first, first + len(self.instances))):
            raise ValueError(f"a step's instances must be contiguous ascending SP ranks, "
                             f"got {self.instances}")
