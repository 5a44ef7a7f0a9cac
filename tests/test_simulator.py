"""`csps simulate`: the event loop on scripted workloads (times worked out by hand), its books,
determinism, the bench-serve JSON, and the command line."""

from __future__ import annotations

import json

import pytest

from csps.bench.workload import WorkloadConfig, build_workload
from csps.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from csps.costmodel.models import model_shape
from csps.simulator.cluster import build_schedulers, gpu_kv_budget, plan_memory
from csps.simulator.loop import RequestRecord, Simulator
from csps.simulator.result import simulation_result
from csps.simulator.run import SimulationConfig, simulate
from csps.simulator.timer import ConstantTimer, CostModelTimer

BENCH_KEYS = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
              "request_throughput", "request_goodput", "output_throughput",
              "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
              "latencies", "start_times", "errors"] + [
    f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p90", "p99")
    for metric in ("ttft", "tpot", "itl", "e2el")]


class ConstantCostModel:
    """Every iteration takes `seconds`, whatever the work (a fake CostModel)."""

    name = "constant"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def rank_time(self, work) -> float:
        return self.seconds

    def iteration_time(self, works) -> float:
        return self.seconds


def engine(budget=64, max_len=256, sp=1, policy="auto", block=16, **scheduler):
    return EngineConfig(model=ModelConfig(max_model_len=max_len),
                        cache=CacheConfig(block_size=block),
                        scheduler=SchedulerConfig(policy=policy, max_num_batched_tokens=budget,
                                                  **scheduler),
                        parallel=ParallelConfig(sequence_parallel_size=sp))


def small_simulator(config, timer, num_blocks=64, replicas=1, **kwargs):
    shape = model_shape("llama-2-7b")
    plan = plan_memory(config, shape, num_blocks * config.cache.block_size
                       * shape.kv_bytes_per_token, 4096)
    return Simulator(build_schedulers(config, plan, replicas), timer, **kwargs)


def test_a_scripted_workload_gets_the_hand_computed_ttft_and_latency():
    """Budget 64, 0.1 s per iteration. t=0: a (100 tokens) runs 64. t=0.05: b arrives.
    t=0.1: a's last 36 + b's 10 -> both sample at 0.2. Decodes at 0.3 (b done: 2 tokens)
    and 0.4 (a done: 3 tokens)."""
    sim = small_simulator(engine(), CostModelTimer(ConstantCostModel(0.1), model_shape(
        "llama-2-7b"), ParallelConfig(), 16))
    records = sim.run([RequestRecord("a", 100, 3, 0.0), RequestRecord("b", 10, 2, 0.05)])
    a, b = records
    assert a.token_times == pytest.approx([0.2, 0.3, 0.4]) and a.finish_s == pytest.approx(0.4)
    assert b.token_times == pytest.approx([0.2, 0.3]) and b.finish_s == pytest.approx(0.3)
    result = simulation_result(records, sim)
    assert result["ttfts"] == pytest.approx([0.2, 0.15])
    assert result["latencies"] == pytest.approx([0.4, 0.25])
    assert result["itls"] == [pytest.approx([0.1, 0.1]), pytest.approx([0.1])]
    assert result["duration"] == pytest.approx(0.4) and result["completed"] == 2
    assert result["simulator"]["iterations_by_kind"] == {"prefill": 2, "decode": 2}


def test_max_concurrency_holds_requests_back_until_one_finishes():
    sim = small_simulator(engine(), ConstantTimer(0.1), max_concurrency=1)
    a, b = sim.run([RequestRecord("a", 10, 2, 0.0), RequestRecord("b", 10, 1, 0.0)])
    assert a.token_times == pytest.approx([0.1, 0.2])
    assert b.send_s == pytest.approx(0.2) and b.token_times == pytest.approx([0.3])
    assert simulation_result([a, b], sim)["ttfts"] == pytest.approx([0.1, 0.1])


def test_too_long_prompts_fail_and_the_rest_finish_with_no_kv_left():
    sim = small_simulator(engine(), ConstantTimer(0.01), replicas=2)
    workload = [RequestRecord(f"r{i}", 20 + 7 * i, 1 + i % 5, 0.01 * i) for i in range(30)]
    workload.append(RequestRecord("huge", 300, 4, 0.0))  # max_model_len is 256
    records = sim.run(workload)
    assert records[-1].error and "max_model_len" in records[-1].error
    assert all(r.finish_s is not None and not r.error for r in records[:-1])
    assert all(len(r.token_times) == r.output_len for r in records[:-1])
    assert all(s.iterations for s in sim.stats)  # both replicas got work
    for scheduler in sim.schedulers:
        scheduler.check_invariants()
        assert not scheduler.has_unfinished_requests()
        assert scheduler.kv_cache_manager.num_free_blocks == \
            scheduler.kv_cache_manager.num_total_blocks
    result = simulation_result(records, sim)
    assert (result["completed"], result["failed"]) == (30, 1)


def test_preemption_under_kv_pressure_still_finishes_everything():
    sim = small_simulator(engine(budget=256, max_len=160), ConstantTimer(0.01), num_blocks=12)
    records = sim.run([RequestRecord(f"r{i}", 60, 60, 0.0) for i in range(4)])
    assert all(len(r.token_times) == 60 for r in records)
    assert sim.schedulers[0].num_preemptions > 0
    sim.schedulers[0].check_invariants()


def gpu_config(seed=0, policy="sps2", sp=4, **overrides):
    config = EngineConfig(model=ModelConfig(seed=seed),
                          scheduler=SchedulerConfig(policy=policy),
                          parallel=ParallelConfig(sequence_parallel_size=sp))
    return SimulationConfig(config, model="llama-3-8b-262k", cluster="8xA100-80GB-nvlink",
                            **overrides)


def gpu_workload(seed=0, n=40):
    return build_workload(WorkloadConfig(num_prompts=n, request_rate=4.0, random_input_len=6000,
                                         random_output_len=20, random_range_ratio=0.9,
                                         seed=seed))


def test_a_roofline_run_is_deterministic_and_has_the_bench_keys():
    first = simulate(gpu_config(), gpu_workload())
    second = simulate(gpu_config(), gpu_workload())
    other = simulate(gpu_config(), gpu_workload(seed=1))
    assert first["ttfts"] == second["ttfts"] and first["itls"] == second["itls"]
    assert first["ttfts"] != other["ttfts"]
    assert set(BENCH_KEYS) <= set(first) and first["completed"] == 40
    sim = first["simulator"]
    assert sim["iterations_by_kind"].get("sp_prefill", 0) > 0
    assert sim["comm_bytes"]["prefill_attn"] > 0
    (replica,) = sim["replicas"]
    assert len(replica["rank_busy_s"]) == 4
    assert all(0 < u <= 1 for u in replica["rank_utilization"])
    json.dumps(first)  # plain JSON


def test_gpu_memory_plan_leaves_weights_out_of_the_kv_budget():
    from csps.costmodel.hardware import GIB, ClusterSpec

    shape = model_shape("llama-2-7b")
    budget = gpu_kv_budget(ClusterSpec.parse("1xA100-80GB"), shape, tp=1)
    assert budget == int(80 * GIB * 0.9) - shape.weight_bytes - GIB
    plan = plan_memory(engine(max_len=None), shape, budget, 4096)
    assert plan.num_blocks == budget // (16 * shape.kv_bytes_per_token)
    assert plan.max_model_len == 4096  # the model's context fits
    with pytest.raises(ValueError, match="does not fit"):
        gpu_kv_budget(ClusterSpec.parse("1xA100-40GB"), model_shape("llama-3-70b"), tp=1)


def test_the_cli_writes_a_result_that_bench_compare_reads(tmp_path, capsys):
    from csps.bench.compare import compare_files
    from csps.cli import main

    for policy, sp in (("sarathi", "1"), ("sps2", "2")):
        status = main(["simulate", "--model", "llama-2-7b", "--cluster", "2xA100-80GB",
                       "--scheduler", policy, "-sp", sp, "--num-prompts", "20",
                       "--request-rate", "5", "--random-input-len", "1500",
                       "--random-output-len", "8", "--disable-tqdm", "--save-result",
                       "--result-dir", str(tmp_path), "--result-filename", f"{policy}.json",
                       "--label", policy])
        assert status == 0
    saved = json.loads((tmp_path / "sps2.json").read_text())
    assert set(BENCH_KEYS) <= set(saved) and saved["completed"] == 20
    assert saved["config"]["engine"]["parallel"]["sequence_parallel_size"] == 2
    table = compare_files([tmp_path / "sarathi.json", tmp_path / "sps2.json"])
    assert "sarathi" in table and "sps2" in table
    assert "Successful requests" in capsys.readouterr().out


def test_the_simulator_and_cost_models_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, csps.cli, csps.simulator.cli, csps.simulator.run, "
            "csps.costmodel.roofline\ncsps.cli.build_parser()\n"
            "sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sub_group_sp_prefills_in_one_iteration_add_up_per_rank_with_their_own_attention():
    from csps.contract.sp_attention import SpAttention
    from csps.contract.step import ScheduledRequest, SchedulerOutput
    from csps.costmodel.work import iteration_work, sp_prefill_work
    from csps.request import SamplingParams

    shape, parallel = model_shape("llama-2-7b"), ParallelConfig(sequence_parallel_size=4)

    def sp_prefill(rid, lens, leader, attention):
        return ScheduledRequest(rid, [0] * sum(lens), 0, [], SamplingParams(), True,
                                leader=leader, sp_chunk_lens=lens, sp_attention=attention)

    output = SchedulerOutput(1, [sp_prefill("a", (64, 64, 0, 0), 1, SpAttention("ring")),
                                 sp_prefill("b", (0, 0, 32, 48), 3, None)])
    works = iteration_work(output, shape, parallel, 16)
    ring = sp_prefill_work([64, 64, 0, 0], shape, parallel, SpAttention("ring"))
    ulysses = sp_prefill_work([0, 0, 32, 48], shape, parallel, SpAttention("ulysses"))
    for rank, (work, a, b) in enumerate(zip(works, ring, ulysses, strict=True)):
        assert work.num_tokens == a.num_tokens + b.num_tokens
        assert work.attn_pairs == a.attn_pairs + b.attn_pairs
        assert work.comm_bytes == {**a.comm_bytes, **b.comm_bytes}
        assert work.num_sampled == int(rank in (1, 3))
    assert works[0].overlappable_bytes > 0 and works[2].overlappable_bytes == 0  # ring vs not
