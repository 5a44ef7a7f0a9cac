"""Measure engine steps on this machine for the fitted cost model (`csps profile`).

Drives the real LLMEngine (sps2 over sp_size workers; sarathi on one) with crafted workloads:
local prefills of several lengths (whole, and chunked under the token budget), SP prefills with
each SP attention algorithm (CSA at the default levels), decode batches of several sizes and
contexts, local and spread over the ranks (q-move). With whole_prompts, one more engine runs
batches of whole prompts up to the longest, each on a rank of its own, beside long-context
decodes: the steps loongserve's one-instance groups run. Every step is recorded with its
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
from csps.costmodel.profile_plan import (  # noqa: F401 (the profile's public names)
    ALGORITHMS,
    BLOCK_SIZE,
    WHOLE,
    ProfileConfig,
    Workload,
    engine_names,
    num_workloads,
    plan_whole_workloads,
    plan_workloads,
    profile_geometry,
    token_budget,
)
from csps.costmodel.shape import ModelShape
from csps.costmodel.work import iteration_work


@dataclass
class StepRecord:
    kind: str
    sp_attention: str
    output: SchedulerOutput
    works: list[RankWork]
    step_s: float  # wall time of LLMEngine.step()
    execute_s: float  # RunnerOutput.execute_time_s: the slowest worker's model time


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
    for index, algorithm in enumerate(engine_names(config)):
        whole = algorithm == WHOLE
        attention = config.algorithms[0] if whole else algorithm
        parallel = ParallelConfig(sequence_parallel_size=config.sp_size, sp_attention=attention)
        recorder = None

        def factory(cfg, kwargs):
            nonlocal recorder
            recorder = _RecordingExecutor(make_executor(cfg, kwargs))
            return recorder

        # the whole-prompt engine: every prompt local (threshold above the longest), and a
        # budget that holds the largest batch in one step
        engine = LLMEngine(engine_config_from_kwargs(
            model=config.model, sequence_parallel_size=config.sp_size, sp_attention=attention,
            max_model_len=max_len + config.decode_steps + 1, block_size=BLOCK_SIZE,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes, seed=config.seed,
            max_num_batched_tokens=2 * max_len if whole else token_budget(threshold),
            # NOTE: the threshold rule decides SP vs local, not the sps2 configurator priced
            # by an earlier profile (which would skew what this one measures)
            cost_model="none", lockstep=True,  # one step per engine step: its time
            **({"long_prompt_threshold": max_len + 1 if whole else threshold}
               if config.sp_size > 1 else {})),
            executor_factory=factory)
        plan = (plan_whole_workloads(config, max_len) if whole
                else plan_workloads(config, max_len, threshold, index == 0))
        try:
            for workload in plan:
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
