"""The simulator and the engine make the same scheduling decisions (issue 7's validation, on
per-instance steps since issue 12).

One scripted workload (six prompts of mixed lengths, two of them SP-long, all sent at t = 0,
ignore_eos, fixed max_tokens) runs through (a) the real LLMEngine on the tiny random model,
with spawned SP worker processes when sp = 2, and (b) `csps simulate`'s build path
(build_simulator: the same EngineConfig, memory plan from the same KV budget, the same fitted
cost model as predictor). Every Step each scheduler emits is recorded by wrapping
`scheduler.schedule_steps`; the steps must be identical: their instances and, per request, its
id, tokens scheduled, tokens computed, SP chunk lengths, KV ranks and leader. Steps on disjoint
instances run concurrently, so which one finishes first decides what is scheduled next: the
engine's executor is wrapped to report finished steps in the order of the simulator's clock
(ClockedExecutor; the steps themselves run for real, their tokens feed the engine back).
"""

from __future__ import annotations

import dataclasses

import pytest

from csps.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ObservabilityConfig,
    ParallelConfig,
    SchedulerConfig,
)
from csps.contract.step import RunnerOutput, SchedulerOutput, Step
from csps.contract.step_trace import read_step_trace
from csps.costmodel.fitted import FittedCostModel
from csps.costmodel.shape import ModelShape
from csps.request import SamplingParams
from csps.simulator.loop import RequestRecord
from csps.simulator.run import SimulationConfig, build_simulator

PROMPT_LENS = (300, 40, 17, 450, 90, 160)  # two over the SP threshold (128) on sp = 2
MAX_TOKENS = 12
BLOCK = 16
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, fp32
POOL_BLOCKS = 48  # per SP rank: 768 tokens, less than the 1,057 prompt tokens (KV queueing)


def decisions(output: SchedulerOutput) -> list[tuple]:
    """Per request its decisions; a step's KV moves, if any, as one more entry of the same
    shape (no tokens, no chunks; the moves' ranks and positions in place of KV ranks)."""
    out = [(r.request_id, r.num_scheduled_tokens, r.num_computed_tokens, r.sp_chunk_lens,
            tuple(t.rank for t in r.kv_ranges), r.leader) for r in output.scheduled_requests]
    if output.kv_moves:
        out.append(("kv_moves", 0, 0, None, tuple((m.request_id, m.src.rank, m.dst.rank,
                                                   m.src.start, m.src.end)
                                                  for m in output.kv_moves), None))
    return out


def record_decisions(scheduler) -> list[tuple]:
    """Wrap scheduler.schedule_steps so that every step's instances and decisions are appended
    to the list."""
    seen: list[tuple] = []
    schedule_steps = scheduler.schedule_steps

    def recording_schedule_steps() -> list[Step]:
        steps = schedule_steps()
        seen.extend((step.instances, decisions(step.scheduler_output)) for step in steps)
        return steps

    scheduler.schedule_steps = recording_schedule_steps
    return seen


class ClockedExecutor:
    """The engine's executor, finishing steps in the simulator's order: each submitted step
    ends at (the clock when it started) + the simulator timer's seconds; wait_steps waits for
    every step in flight to finish for real, then returns those ending first (ties in submit
    order) and keeps the rest in flight, as the simulator's event loop does."""

    def __init__(self, inner, timer) -> None:
        self.inner, self.timer, self.clock = inner, timer, 0.0
        self._ends: dict[int, tuple[float, int]] = {}  # step id -> (end time, submit order)
        self._done: dict[int, tuple[Step, RunnerOutput]] = {}

    def submit(self, step: Step) -> None:
        self._ends[step.step_id] = (self.clock + self.timer(step.scheduler_output).seconds,
                                    len(self._ends) + len(self._done))
        self.inner.submit(step)

    def wait_steps(self, timeout_s=None) -> list[tuple[Step, RunnerOutput]]:
        while len(self._done) < len(self._ends):
            for step, out in self.inner.wait_steps(timeout_s):
                self._done[step.step_id] = (step, out)
        if not self._ends:
            return []
        self.clock = min(end for end, _ in self._ends.values())
        first = sorted((order, i) for i, (end, order) in self._ends.items() if end == self.clock)
        finished = []
        for _, step_id in first:
            del self._ends[step_id]
            finished.append(self._done.pop(step_id))
        # the rest are still running: they come back at a later wait
        self._ends = {i: (end, order) for i, (end, order) in self._ends.items()}
        return finished

    def __getattr__(self, name):  # execute_model, check_health, shutdown
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def model_dir(tiny_engine_dir):
    """The tiny Llama with a byte-level tokenizer (the engine loads one)."""
    return tiny_engine_dir


@pytest.fixture(scope="module")
def cost_model_path(tiny_model_dir, tmp_path_factory):
    """A fitted model of the tiny Llama (made-up, plausible CPU coefficients)."""
    return write_cost_model(tiny_model_dir, tmp_path_factory, "tiny-test", 2e-8)


def write_cost_model(model_dir, tmp_path_factory, name: str, per_attn_pair_s: float):
    shape = ModelShape.from_config_file(model_dir / "config.json", dtype_bytes=4)
    path = tmp_path_factory.mktemp("cost") / f"{name}.json"
    FittedCostModel(per_iteration_s=2e-3, per_token_s=2e-5, per_seq_s=1e-4, per_sampled_s=5e-5,
                    per_attn_pair_s=per_attn_pair_s, per_decode_kv_token_s=1e-7,
                    per_byte_s=2e-9, per_collective_s=5e-5, name=name, shape=shape).to_json(path)
    return path


def engine_config(model_dir, policy: str, sp: int, cost_model: str, **scheduler) -> EngineConfig:
    budget = 512 if policy == "loongserve" else 64  # loongserve prefills prompts whole
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=512, dtype="float32"),
        cache=CacheConfig(block_size=BLOCK, kv_cache_memory_bytes=POOL_BLOCKS * BLOCK
                          * BYTES_PER_TOKEN),
        scheduler=SchedulerConfig(policy=policy, max_num_batched_tokens=budget,
                                  long_prompt_threshold=128, cost_model=cost_model, **scheduler),
        parallel=ParallelConfig(sequence_parallel_size=sp))


def run_engine(config: EngineConfig, timer, lens=PROMPT_LENS) -> list[tuple]:
    from csps.engine.executor import make_executor
    from csps.engine.llm_engine import LLMEngine

    engine = LLMEngine(config, executor_factory=lambda cfg, kwargs: ClockedExecutor(
        make_executor(cfg, kwargs), timer))
    try:
        seen = record_decisions(engine.scheduler)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for i, n in enumerate(lens):
            engine.add_request(f"req-{i}", None, [3 + (7 * i + j) % 250 for j in range(n)],
                               params)
        done: dict[str, int] = {}
        while engine.has_unfinished_requests():
            for out in engine.step()[0]:
                done[out.request_id] = len(out.outputs[0].token_ids)
        assert done == {f"req-{i}": MAX_TOKENS for i in range(len(lens))}
        return seen
    finally:
        engine.shutdown()


def run_simulator(config: EngineConfig, model_dir, cost_model_path, lens=PROMPT_LENS):
    """The simulator always prices with the fitted model (the KV budget then comes from the
    engine's --kv-cache-memory-bytes); under cost_model 'none' the policies get no predictor.
    Returns (its steps' decisions, its step timer)."""
    predicted = config.scheduler.cost_model != "none"
    config = dataclasses.replace(config, scheduler=dataclasses.replace(
        config.scheduler, cost_model=str(cost_model_path)))
    simulator, info = build_simulator(SimulationConfig(config, model=str(model_dir),
                                                       sp_degrees="engine",
                                                       use_predictor=predicted))
    assert info["memory"]["num_blocks"] == POOL_BLOCKS
    (scheduler,) = simulator.schedulers
    seen = record_decisions(scheduler)
    records = simulator.run([RequestRecord(f"req-{i}", n, MAX_TOKENS, 0.0)
                             for i, n in enumerate(lens)])
    assert all(len(r.token_times) == MAX_TOKENS and not r.error for r in records)
    if simulator.step_trace is not None:
        simulator.step_trace.close()
    return seen, simulator.timer


def with_trace(config: EngineConfig, path) -> EngineConfig:
    return dataclasses.replace(config, observability=ObservabilityConfig(step_trace=str(path)))


def traced_decisions(path) -> list[tuple]:
    """A --step-trace file's steps in the order they were scheduled, as record_decisions."""
    steps = sorted(read_step_trace(path), key=lambda s: s.step_id)
    return [(s.instances, decisions(s.scheduler_output)) for s in steps]


@pytest.fixture(scope="module")
def attention_bound_cost_model_path(tiny_model_dir, tmp_path_factory):
    """The same with attention 100x dearer: splitting a long prompt over ranks pays."""
    return write_cost_model(tiny_model_dir, tmp_path_factory, "tiny-attention-bound", 2e-6)


SPAWNED = pytest.mark.slow  # sp = 2: two worker processes


CHUNKED = {"lockstep": False, "sp_prefill_chunk": 64}  # 300 / 450 tokens: 3 / 4 slices
# Short prompts first: they run on one instance each, side by side, before the long ones bind
# both instances (an SP prefill's group; then decodes over KV spread across both).
SHORT_FIRST = (40, 17, 60, 90, 300, 450)
# loongserve on steps: the first three (within the two instances' 512-token budgets) are
# planned together, each prompt whole on one instance, side by side; the last waits for their
# decodes, then prefills by ring SP over both instances and is scaled down onto one
LONG_FIRST = (500, 480, 40, 450)


@pytest.mark.parametrize("policy,sp,with_cost_model,scheduler", [
    ("sarathi", 1, False, {}),
    pytest.param("sps2", 2, False, {"lockstep": True}, marks=SPAWNED),
    pytest.param("sps2", 2, False, CHUNKED, marks=SPAWNED),
    # the configurator picks degree and slice size under the SLO (here: one prompt whole, one
    # in slices of 128 tokens per rank)
    pytest.param("sps2", 2, True, {"lockstep": False, "slo_tbt": 0.01}, marks=SPAWNED),
    # the long prompts' KV moved onto one instance after their last slice
    pytest.param("sps2", 2, False, {**CHUNKED, "consolidate_decode_kv": 100.0}, marks=SPAWNED),
    pytest.param("loongserve", 2, True, {"lockstep": True}, marks=SPAWNED),
    # per-instance steps: short prompts side by side, then ring SP prefills scaled down
    pytest.param("loongserve", 2, True, {"lockstep": False}, marks=SPAWNED)])
def test_simulator_and_engine_schedule_identically(model_dir, cost_model_path,
                                                   attention_bound_cost_model_path, policy, sp,
                                                   with_cost_model, scheduler, tmp_path):
    if policy == "loongserve" and not scheduler["lockstep"]:
        cost_model_path = attention_bound_cost_model_path
    config = engine_config(model_dir, policy, sp,
                           str(cost_model_path) if with_cost_model else "none", **scheduler)
    lens = PROMPT_LENS if scheduler.get("lockstep", True) else SHORT_FIRST
    if policy == "loongserve" and not scheduler["lockstep"]:
        lens = LONG_FIRST
    traces = {side: tmp_path / f"{side}-steps.jsonl" for side in ("sim", "engine")}
    simulated, timer = run_simulator(with_trace(config, traces["sim"]), model_dir,
                                     cost_model_path, lens)
    served = run_engine(with_trace(config, traces["engine"]), timer, lens)
    assert len(served) == len(simulated)
    for index, (a, b) in enumerate(zip(served, simulated, strict=True)):
        assert a == b, f"step {index + 1} differs"
    # --step-trace: both sides wrote every step, read back as the cost model prices it
    assert traced_decisions(traces["engine"]) == served
    assert traced_decisions(traces["sim"]) == simulated
    for step in read_step_trace(traces["sim"]):
        assert timer(step.scheduler_output).seconds == pytest.approx(step.seconds, rel=1e-9)
    flat = [d for _, step in served for d in step]
    assert sum(n for _, n, *_ in flat) == sum(lens) + len(lens) * (MAX_TOKENS - 1)
    sp_prefills = [(chunks, ranks) for *_, chunks, ranks, _ in flat if chunks is not None]
    if policy == "sps2":  # SP prefills, and decodes over KV spread across the ranks
        assert sp_prefills and any(len(set(ranks)) > 1 for *_, ranks, _ in flat)
    if not scheduler.get("lockstep", True):  # steps of one instance ran side by side
        instance_sets = [instances for instances, _ in served]
        assert (0,) in instance_sets and (1,) in instance_sets
    if policy == "sps2" and not scheduler.get("lockstep", True):
        assert len(sp_prefills) > 2  # prompts prefilled in slices
        assert any(any(c is not None for *_, c, _, _ in step) and any(
            c is None and n == 1 for _, n, _, c, _, _ in step) for _, step in served)
    if scheduler.get("consolidate_decode_kv"):  # moved, then decoded on one instance
        moved = {m[0] for step in served for d in step[1] if d[0] == "kv_moves" for m in d[4]}
        assert moved and all(len(set(ranks)) == 1 for rid, n, _, chunks, ranks, _ in flat
                             if rid in moved and n == 1 and chunks is None)
    if policy == "loongserve":  # a ring prefill scaled down: its KV left on fewer ranks
        assert any(len(set(ranks)) < sum(1 for n in chunks if n) for chunks, ranks in sp_prefills)
