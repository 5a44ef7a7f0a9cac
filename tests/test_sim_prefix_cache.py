"""The prefix cache in the simulator: hits worked out by hand on a scripted workload, off with
--no-enable-prefix-caching, the hit rate against the reuse computed from the hash ids on a
small Mooncake-format trace, and prefix routing keeping a conversation on one replica."""

from __future__ import annotations

import json

import pytest

from csps.bench.trace_reuse import reuse_of
from csps.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from csps.costmodel.models import model_shape
from csps.simulator.cluster import build_schedulers, plan_memory
from csps.simulator.loop import RequestRecord, Simulator
from csps.simulator.result import simulation_result
from csps.simulator.timer import ConstantTimer


def simulator(caching=True, replicas=1, routing="least-loaded", num_blocks=64):
    config = EngineConfig(model=ModelConfig(max_model_len=512),
                          cache=CacheConfig(block_size=16, enable_prefix_caching=caching),
                          scheduler=SchedulerConfig(policy="sarathi", max_num_batched_tokens=64))
    shape = model_shape("llama-2-7b")
    plan = plan_memory(config, shape, num_blocks * 16 * shape.kv_bytes_per_token, 4096)
    return Simulator(build_schedulers(config, plan, replicas), ConstantTimer(0.01),
                     hash_block_tokens=32, routing=routing)


# Blocks of 32 tokens per hash id, KV blocks of 16. b shares (0, 1) with a: 64 tokens, 4 KV
# blocks. c is a again: 80 tokens, of which the first 79 are looked up: 4 whole blocks, 64.
# d has no hash ids: nothing. Each arrives after the one before has finished.
SCRIPT = [RequestRecord("a", 80, 2, 0.0, hash_ids=(0, 1, 2)),
          RequestRecord("b", 100, 2, 1.0, hash_ids=(0, 1, 3, 4)),
          RequestRecord("c", 80, 2, 2.0, hash_ids=(0, 1, 2)),
          RequestRecord("d", 50, 2, 3.0)]


def fresh(records):
    return [RequestRecord(r.request_id, r.input_len, r.output_len, r.arrival_s,
                          hash_ids=r.hash_ids) for r in records]


def test_a_scripted_workload_hits_the_hand_computed_tokens():
    sim = simulator()
    records = sim.run(fresh(SCRIPT))
    result = simulation_result(records, sim)
    assert result["prefix_cache_queries"] == 80 + 100 + 80 + 50
    assert result["prefix_cache_hits"] == 64 + 64
    assert result["prefix_cache_hit_rate"] == pytest.approx(128 / 310)
    assert result["cached_tokens"] == [0, 64, 64, 0] and result["total_cached_tokens"] == 128
    (replica,) = result["simulator"]["replicas"]
    assert replica["prefix_cache_hits"] == 128
    # c computes 16 tokens instead of 80: its first token comes one 64-token chunk sooner
    assert result["ttfts"][2] < result["ttfts"][0]
    sim.schedulers[0].check_invariants()


def test_without_the_cache_nothing_hits():
    sim = simulator(caching=False)
    result = simulation_result(sim.run(fresh(SCRIPT)), sim)
    assert result["prefix_cache_hits"] == 0 and result["prefix_cache_hit_rate"] == 0.0
    assert result["completed"] == 4


def test_prefix_routing_keeps_a_conversation_on_the_replica_that_cached_it():
    # turns of three conversations on two replicas, each turn resending the whole previous
    # prompt; every request decodes for 2 s, so the least loaded is often not the one that
    # served the conversation
    turns = [RequestRecord(f"{c}{t}", 32 * (t + 1), 200, 0.5 * (3 * t + i),
                           hash_ids=tuple(range(10 * i, 10 * i + t + 1)))
             for t in range(4) for i, c in enumerate("xyz")]
    hits = {}
    for routing in ("least-loaded", "prefix"):
        sim = simulator(replicas=2, routing=routing, num_blocks=256)
        hits[routing] = simulation_result(sim.run(fresh(turns)), sim)["prefix_cache_hits"]
    # prefix: every later turn hits all its predecessor's 32 * t tokens (whole blocks)
    assert hits["prefix"] == 3 * sum(32 * t for t in range(4))
    assert hits["least-loaded"] < hits["prefix"]


def test_a_mooncake_trace_hits_what_its_hash_ids_reuse(tmp_path):
    """A small trace as Mooncake's: a prompt's last, partial block is never another prompt's
    (ids hash block text), so with a cache that keeps everything the hits are exactly the
    reuse from the hash ids (whole 512-token blocks: whole KV blocks too)."""
    from csps.bench.workload import WorkloadConfig, build_workload
    from csps.simulator.run import SimulationConfig, simulate

    rows = [{"timestamp": 2000 * i, "input_length": 512 * len(ids) - 100,
             "output_length": 4, "hash_ids": ids} for i, ids in enumerate(
                 [[0, 1, 2], [0, 1, 3, 4], [0, 5], [0, 1, 3, 6, 7], [0, 9, 10], [11]])]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = build_workload(WorkloadConfig(dataset_name="trace", dataset_path=str(path)))
    reuse = reuse_of([(s.input_len, s.hash_ids) for s in specs], 512, kv_block_size=16)
    engine = EngineConfig(scheduler=SchedulerConfig(policy="sarathi"))
    result = simulate(SimulationConfig(engine, model="llama-3-8b", cluster="1xA100-80GB"),
                      specs)
    assert reuse.reused_tokens == 1024 + 512 + 1536 + 512
    assert result["prefix_cache_hits"] == reuse.reused_tokens
    assert tuple(result["cached_tokens"]) == reuse.reused_per_request
    assert result["prefix_cache_queries"] == reuse.input_tokens


def test_the_cli_turns_the_cache_off_and_prints_the_hits(tmp_path, capsys):
    from csps.cli import main

    rows = [{"timestamp": 1000 * i, "input_length": 1500, "output_length": 4,
             "hash_ids": [0, 1, 2]} for i in range(3)]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = {}
    for flag in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
        assert main(["simulate", "--model", "llama-3-8b", "--cluster", "1xA100-80GB",
                     "--dataset-name", "trace", "--dataset-path", str(path), flag,
                     "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
                     "--result-filename", f"{flag[2:]}.json"]) == 0
        rates[flag] = json.loads((tmp_path / f"{flag[2:]}.json").read_text())[
            "prefix_cache_hit_rate"]
    assert rates["--no-enable-prefix-caching"] == 0.0
    assert rates["--enable-prefix-caching"] == pytest.approx(2 * (1500 - 12) / 4500)
    assert "prefix cache:" in capsys.readouterr().out
