"""Measure engine steps on this machine for the fitted cost model (`csps profile`).

Drives the real LLMEngine (sps2 over sp_size workers; sarathi on one) with crafted workloads:
local prefills of several lengths (whole, and chunked under the token budget), SP prefills with
each SP attention algorithm (CSA at the default levels), decode batches of several sizes and
contexts, local and spread over the ranks (q-move). Every step is recorded with its
SchedulerOutput, its per-rank work (work.iteration_work) and its wall time; a workload run
`repeats` times keeps each step's fastest time (the machine is shared: others' load only adds).
NOTE: this module imports no torch itself; the engine (and torch) load inside run_profile.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from csps.config import ParallelConfig
from csps.contract.step import SchedulerOutput
from csps.costmodel.base import RankWork
from csps.costmodel.shape import ModelShape
from csps.costmodel.work import iteration_work

BLOCK_SIZE = 16


@dataclass(frozen=True)
class ProfileConfig:
    model: str  # a name (smollm2-135m), a Hugging Face folder or a .gguf file
    sp_size: int = 2
    quick: bool = False  # one SP algorithm, short prompts, no repeats: under a minute
    max_tokens: int | None = None  # the longest prompt profiled (None: 3072, 512 quick)
    seed: int = 0
    kv_cache_memory_bytes: int = 512 << 20  # per worker

    def __post_init__(self) -> None:
        if self.sp_size < 1:
            raise ValueError(f"sp_size must be positive, got {self.sp_size}")
        if self.max_tokens is not None and self.max_tokens < 64:
            raise ValueError(f"max_tokens must be at least 64, got {self.max_tokens}")

    @property
    def longest_prompt(self) -> int:
        return self.max_tokens or (512 if self.quick else 3072)

    @property
    def decode_steps(self) -> int:
        return 4 if self.quick else 8

    @property
    def algorithms(self) -> tuple[str, ...]:
        if self.sp_size == 1 or self.quick:
            return ("ulysses",)  # one engine (with sp_size 1: no SP prefill at all)
        return ("ulysses", "allgather_kv", "ring", "csa")


@dataclass(frozen=True)
class Workload:
    kind: str  # warmup | prefill_local | prefill_sp | decode_local | decode_spread
    prompt_lens: tuple[int, ...]  # requests added together
    max_tokens: int  # output tokens per request (1: the prefill's token only)
    repeats: int = 1  # runs; each step keeps its fastest time


@dataclass
class StepRecord:
    kind: str
    sp_attention: str
    output: SchedulerOutput
    works: list[RankWork]
    step_s: float  # wall time of LLMEngine.step()
    execute_s: float  # RunnerOutput.execute_time_s: the slowest worker's model time


def plan_workloads(config: ProfileConfig, max_len: int, threshold: int,
                   first: bool) -> list[Workload]:
    """One engine's workloads. Only the first engine runs the local and decode ones; every
    engine runs the SP prefills (the part that differs between SP algorithms)."""
    quick, steps, sp = config.quick, config.decode_steps, config.sp_size > 1
    reps = 1 if quick else 2
    plan = [Workload("warmup", (threshold // 2, threshold // 2)
                     + ((threshold,) if sp else ()), 2)]
    if first:
        for f in ((1, 3, 6, 8) if quick else (1, 2, 3, 4, 5, 6, 7, 8)):
            # below the SP threshold (local), chunked above the budget (threshold / 4)
            n = threshold * f // 8 - 1 if sp else max_len * f // 8
            plan.append(Workload("prefill_local", (max(8, n),), 1, reps))
        contexts = (threshold // 4,) if quick else (threshold // 8, threshold // 2)
        for batch in ((1, 4) if quick else (1, 4, 16)):
            plan += [Workload("decode_local", (c,) * batch, steps, reps) for c in contexts]
    if sp:
        for s in ((1, 2) if quick else (1, 2, 3, 4) if first else (1, 2, 4)):
            plan.append(Workload("prefill_sp", (min(max_len, threshold * s),), 1))
        if first:
            for batch in ((2,) if quick else (1, 4)):
                plan.append(Workload("decode_spread", (threshold,) * batch, steps, reps))
    return plan


class _RecordingExecutor:
    """Wraps the engine's executor to keep the (SchedulerOutput, RunnerOutput) pairs of the
    steps finished since the last take()."""

    def __init__(self, inner) -> None:
        self.inner, self.finished = inner, []

    def execute_model(self, scheduler_output):
        runner_output = self.inner.execute_model(scheduler_output)
        self.finished.append((scheduler_output, runner_output))
        return runner_output

    def submit(self, step) -> None:
        self.inner.submit(step)

    def wait_steps(self, timeout_s=None):
        done = self.inner.wait_steps(timeout_s)
        self.finished.extend((step.scheduler_output, out) for step, out in done)
        return done

    def take(self) -> list:
        finished, self.finished = self.finished, []
        return finished

    def check_health(self) -> None:
        self.inner.check_health()

    def shutdown(self) -> None:
        self.inner.shutdown()


def profile_geometry(config: ProfileConfig, max_position: int) -> tuple[int, int]:
    """(longest prompt, SP prefill threshold) for a model of max_position positions."""
    max_len = min(config.longest_prompt, max_position - config.decode_steps - 1)
    return max_len, max(16, max_len // 4)


def token_budget(threshold: int) -> int:
    """The engines' max_num_batched_tokens: local prompts near the threshold run in 4 chunks."""
    return max(16, threshold // 4)


def num_workloads(config: ProfileConfig, max_len: int, threshold: int) -> int:
    return sum(len(plan_workloads(config, max_len, threshold, i == 0))
               for i in range(len(config.algorithms)))


def model_shape(model: str, dtype: str = "auto",
                device: str = "auto") -> tuple[ModelShape, int]:
    """The model's shape at the dtype the engine will run it in (fp32 on CPU), and its
    max_position_embeddings."""
    from csps.engine.worker import resolve_device, resolve_dtype  # torch: only here
    from csps.model.resolve import resolve_model

    folder = resolve_model(model)
    dtype = resolve_dtype(dtype, resolve_device(device))
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    shape = ModelShape.from_config_file(folder / "config.json", dtype_bytes=size)
    hf_config = json.loads((folder / "config.json").read_text())
    return shape, hf_config.get("max_position_embeddings", 2048)


def run_profile(config: ProfileConfig, shape: ModelShape, max_position: int,
                progress=None) -> list[StepRecord]:
    """Run every engine's workloads; returns one StepRecord per measured step (warm-up steps
    excluded). progress(num_steps) is called after each workload."""
    from csps.config import engine_config_from_kwargs  # the engine loads torch: only here
    from csps.engine.executor import make_executor
    from csps.engine.llm_engine import LLMEngine

    rng = random.Random(config.seed)
    max_len, threshold = profile_geometry(config, max_position)
    records: list[StepRecord] = []
    for index, algorithm in enumerate(config.algorithms):
        parallel = ParallelConfig(sequence_parallel_size=config.sp_size, sp_attention=algorithm)
        recorder = None

        def factory(cfg, kwargs):
            nonlocal recorder
            recorder = _RecordingExecutor(make_executor(cfg, kwargs))
            return recorder

        engine = LLMEngine(engine_config_from_kwargs(
            model=config.model, sequence_parallel_size=config.sp_size, sp_attention=algorithm,
            max_model_len=max_len + config.decode_steps + 1, block_size=BLOCK_SIZE,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes, seed=config.seed,
            max_num_batched_tokens=token_budget(threshold),
            # NOTE: the threshold rule decides SP vs local, not the sps2 configurator priced
            # by an earlier profile (which would skew what this one measures)
            cost_model="none", lockstep=True,  # one step per engine step: its time
            **({"long_prompt_threshold": threshold} if config.sp_size > 1 else {})),
            executor_factory=factory)
        try:
            for workload in plan_workloads(config, max_len, threshold, index == 0):
                runs = [_run(engine, recorder, workload, rng)
                        for _ in range(workload.repeats)]
                if workload.kind == "warmup":
                    if progress is not None:
                        progress(0)
                    continue
                shapes = {tuple(o.total_num_scheduled_tokens for o, _, _ in r) for r in runs}
                if len(shapes) > 1:  # NOTE: the schedules differ: keep the first run only
                    runs = runs[:1]
                for steps in zip(*runs, strict=True):  # the same schedule in every run
                    output, execute_s = steps[0][0], steps[0][2]
                    records.append(StepRecord(
                        workload.kind, algorithm, output,
                        iteration_work(output, shape, parallel, BLOCK_SIZE),
                        min(s[1] for s in steps), execute_s))
                if progress is not None:
                    progress(len(runs[0]))
        finally:
            engine.shutdown()
    return records


def _run(engine, recorder: _RecordingExecutor, workload: Workload,
         rng: random.Random) -> list[tuple[SchedulerOutput, float, float]]:
    """Add the workload's requests, step until they finish: (output, step_s, execute_s)."""
    from csps.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
    vocab = engine.arch.vocab_size
    for n in workload.prompt_lens:
        engine.add_request(f"{workload.kind}-{rng.getrandbits(48):x}", None,
                           [rng.randrange(3, vocab) for _ in range(n)], params)
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        step_s = time.perf_counter() - start
        # NOTE: the profile's engines run lock-step: one step per engine step
        for output, runner_output in recorder.take():
            if not output.is_empty:
                steps.append((output, step_s, runner_output.execute_time_s))
    return steps
