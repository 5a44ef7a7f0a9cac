"""One simulation from its settings: cost model, memory plan, schedulers, workload, result.

The cost model is the GPU roofline of `cluster` and `model` (csps/costmodel/roofline.py) unless
`cost_model_path` names a JSON (a fitted CPU profile from `csps profile`, or a roofline file);
the same model prices the simulated iterations and, through a StepPredictor, the policies'
plans (an oracle predictor; "none", as in the engine, leaves the policies without one). No
torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from csps.bench.metrics import GoodputSLOs
from csps.bench.traces import MOONCAKE_BLOCK_TOKENS
from csps.bench.workload import RequestSpec
from csps.config import EngineConfig
from csps.contract.step_trace import StepTraceWriter
from csps.costmodel.hardware import ClusterSpec
from csps.costmodel.models import max_position_embeddings, model_shape
from csps.costmodel.roofline import DTYPE_BYTES, RooflineCostModel
from csps.scheduler.predictor import StepPredictor
from csps.simulator.cluster import build_schedulers, gpu_kv_budget, plan_memory
from csps.simulator.loop import RequestRecord, Simulator
from csps.simulator.result import simulation_result
from csps.simulator.routing import ROUTINGS
from csps.simulator.timer import CostModelTimer

SP_DEGREES = ("all", "engine")  # any of 1..P (simulator) or {1, P} (what the workers run)


@dataclass(frozen=True)
class SimulationConfig:
    engine: EngineConfig  # scheduler, parallel and cache settings, as `csps serve` takes them
    model: str = "llama-3-8b"  # bundled model name or config.json path (the roofline's shape)
    cluster: str = "8xA100-80GB-nvlink"  # preset name or JSON file (hardware.py)
    num_replicas: int = 1  # independent SP x TP groups (data parallelism)
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory for weights + KV
    iteration_overhead_s: float | None = None  # roofline's per-iteration cost (None: default)
    sp_degrees: str = "all"  # SP prefill group sizes the policies may choose
    use_predictor: bool = True  # False: policies plan without a cost model (sps2's threshold)
    max_concurrency: int | None = None  # most requests in flight (the client's limit)
    # prompt tokens per Mooncake hash id: 512 x the workload's length_scale (prompt_tokens.py)
    hash_block_tokens: int = MOONCAKE_BLOCK_TOKENS
    routing: str = "least-loaded"  # which replica gets a request (routing.py ROUTINGS)
    # A second cost model that prices the steps, where the machine differs from the model the
    # engine plans with (e.g. fitted on a real run's --step-trace); "": the engine's model.
    timing_cost_model: str = ""
    # False: a request arriving while a replica has a step in flight waits for a step to end
    # before anything is scheduled (the engine before its Wakeup, the torchrun executor);
    # True: free instances start at once.
    arrival_starts_steps: bool = True

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.sp_degrees not in SP_DEGREES:
            raise ValueError(f"sp_degrees must be one of {SP_DEGREES}, got {self.sp_degrees!r}")
        if self.iteration_overhead_s is not None and self.iteration_overhead_s < 0:
            raise ValueError("iteration_overhead_s must be >= 0")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.hash_block_tokens < 1:
            raise ValueError(f"hash_block_tokens must be >= 1, got {self.hash_block_tokens}")


def build_simulator(config: SimulationConfig,
                    on_request_done: Callable[[RequestRecord], None] | None = None
                    ) -> tuple[Simulator, dict]:
    """The Simulator, and a description of what was built (for the result's "config")."""
    engine, parallel = config.engine, config.engine.parallel
    sp, tp = parallel.sequence_parallel_size, parallel.tensor_parallel_size
    path = engine.scheduler.cost_model
    no_predictor = path == "none"  # the engine's "no cost model": roofline time, plain policies
    path = "" if no_predictor else path
    if path:
        from csps.costmodel.load import load_cost_model

        cost_model = load_cost_model(path)
    else:
        dtype = "bfloat16" if engine.model.dtype == "auto" else engine.model.dtype
        overhead = {} if config.iteration_overhead_s is None else {
            "iteration_overhead_s": config.iteration_overhead_s}
        cost_model = RooflineCostModel(ClusterSpec.parse(config.cluster),
                                       model_shape(config.model, DTYPE_BYTES[dtype]),
                                       tp=tp, sp=sp, **overhead)
    shape = getattr(cost_model, "shape", None) or model_shape(config.model)
    cluster = getattr(cost_model, "cluster", None)
    if cluster is not None:
        if config.num_replicas * sp * tp > cluster.num_gpus:
            raise ValueError(f"{config.num_replicas} replica(s) x sp {sp} x tp {tp} need more "
                             f"than the {cluster.num_gpus} GPUs of {cluster.name or 'cluster'}")
        budget = gpu_kv_budget(cluster, shape, tp, config.gpu_memory_utilization)
    else:  # a fitted CPU profile: the engine's KV budget per worker
        budget = engine.cache.kv_cache_memory_bytes
    try:  # the model's context; a profile's own model: whatever its KV budget holds
        model_len = max_position_embeddings(config.model) if shape.name == model_shape(
            config.model).name else 1 << 20
    except ValueError:
        model_len = 1 << 20
    plan = plan_memory(engine, shape, budget, model_len)
    kwargs: dict = {}
    if config.use_predictor and not no_predictor:
        kwargs["predictor"] = StepPredictor(cost_model, shape, parallel, engine.cache.block_size)
    if engine.scheduler.allowed_sp_degrees:  # --sp-prefill-degrees, as the engine reads it
        kwargs["allowed_sp_degrees"] = list(engine.scheduler.allowed_sp_degrees)
    elif config.sp_degrees == "all":
        kwargs["allowed_sp_degrees"] = list(range(1, sp + 1))
    schedulers = build_schedulers(engine, plan, config.num_replicas, **kwargs)
    if config.timing_cost_model:
        from csps.costmodel.load import load_cost_model

        timing = load_cost_model(config.timing_cost_model)
    else:
        timing = cost_model
    timer = CostModelTimer(timing, shape, parallel, engine.cache.block_size)
    simulator = Simulator(schedulers, timer, config.max_concurrency, on_request_done,
                          config.hash_block_tokens, config.routing)
    simulator.arrival_starts_steps = config.arrival_starts_steps
    if engine.observability.step_trace:
        simulator.step_trace = StepTraceWriter(engine.observability.step_trace)
    cost_dict = cost_model.to_dict() if hasattr(cost_model, "to_dict") else {"name": path}
    if timing is not cost_model:
        cost_dict = {"planning": cost_dict, "timing": timing.to_dict()}
    info = {"simulation": {k: v for k, v in dataclasses.asdict(config).items() if k != "engine"},
            "engine": engine.to_dict(), "cost_model": cost_dict,
            "memory": dataclasses.asdict(plan), "shape": dataclasses.asdict(shape)}
    return simulator, info


def records_from_specs(specs: Sequence[RequestSpec]) -> list[RequestRecord]:
    return [RequestRecord(f"req-{i}", s.input_len, s.output_len, s.arrival_s,
                          hash_ids=s.hash_ids) for i, s in enumerate(specs)]


def simulate(config: SimulationConfig, specs: Sequence[RequestSpec],
             slos: GoodputSLOs | None = None,
             on_request_done: Callable[[RequestRecord], None] | None = None) -> dict:
    """Run the workload; the bench-serve result dict with "simulator" and "config" added."""
    simulator, info = build_simulator(config, on_request_done)
    try:
        records = simulator.run(records_from_specs(specs))
    finally:
        if simulator.step_trace is not None:
            simulator.step_trace.close()
    result = simulation_result(records, simulator, slos)
    result["config"] = info
    return result
