"""How fast `csps simulate` runs: 10,000 requests on 32 simulated GPUs (issue 7's target: under
a minute on this machine).

    .venv/bin/python benchmarks/simulator_speed.py             # the three layouts below
    .venv/bin/python benchmarks/simulator_speed.py --profile   # plus the top cProfile entries

Layouts of 32 A100-80GB (4 nodes x 8, NVLink + InfiniBand HDR), Llama-3-8B-262k, random
workload (prompts 4096 and outputs 256 tokens, each +-90%, Poisson): sps2 with 4 replicas of
SP 8; sps2 with one SP group of 32; sarathi with 32 single-GPU replicas. Per layout: wall
seconds, CPU seconds of this process (the fairer figure on a shared machine), simulated
seconds, iterations, requests per wall second, and the headline metrics (to see that the
simulated cluster was loaded). Writes benchmarks/results/simulator_speed.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

from csps.bench.workload import WorkloadConfig, build_workload
from csps.config import EngineConfig, ParallelConfig, SchedulerConfig
from csps.simulator.run import SimulationConfig, simulate

LAYOUTS = {"sps2-dp4-sp8": ("sps2", 8, 4), "sps2-sp32": ("sps2", 32, 1),
           "sarathi-dp32": ("sarathi", 1, 32)}


def run_layout(name: str, num_prompts: int, rate: float, profile: bool) -> dict:
    policy, sp, replicas = LAYOUTS[name]
    engine = EngineConfig(scheduler=SchedulerConfig(policy=policy),
                          parallel=ParallelConfig(sequence_parallel_size=sp))
    config = SimulationConfig(engine, model="llama-3-8b-262k", cluster="4x8xA100-80GB-ib",
                              num_replicas=replicas)
    specs = build_workload(WorkloadConfig(num_prompts=num_prompts, request_rate=rate,
                                          random_input_len=4096, random_output_len=256,
                                          random_range_ratio=0.9, seed=0))
    profiler = cProfile.Profile() if profile else None
    start, cpu_start = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    result = simulate(config, specs)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    sim = result["simulator"]
    row = {"layout": name, "policy": policy, "sp": sp, "replicas": replicas,
           "num_prompts": num_prompts, "request_rate": rate, "wall_s": wall, "cpu_s": cpu,
           "loadavg_1min": os.getloadavg()[0],
           "loop_wall_s": sim["wall_s"], "simulated_s": sim["simulated_s"],
           "iterations": sim["iterations"], "iterations_by_kind": sim["iterations_by_kind"],
           "requests_per_wall_s": num_prompts / wall, "completed": result["completed"],
           "output_tokens": result["total_output_tokens"],
           "request_throughput": result["request_throughput"],
           "mean_ttft_ms": result["mean_ttft_ms"], "p99_itl_ms": result["p99_itl_ms"],
           "num_preemptions": sim["num_preemptions"]}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        row["profile_top"] = text.getvalue().splitlines()[-22:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=10_000)
    parser.add_argument("--request-rate", type=float, default=40.0)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/simulator_speed.json")
    args = parser.parse_args()
    rows = []
    for name in args.layouts:
        row = run_layout(name, args.num_prompts, args.request_rate, args.profile)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile_top"}))
        for line in row.get("profile_top", []):
            print(line)
    machine = {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "runs": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
