"""`csps simulate`: run a workload through the real scheduler on a simulated cluster.

Engine flags are `csps serve`'s (generated from the config dataclasses: --scheduler, -sp, -tp,
--max-num-batched-tokens, --cost-model, the policies' options...); workload and result flags
are `csps bench serve`'s, and the result JSON has its keys, so `csps bench compare` reads
simulated and measured runs alike. Example:
  csps simulate --model llama-3-8b-262k --cluster 4x8xA100-80GB-ib -sp 8 -dp 4 \\
      --num-prompts 1000 --request-rate 2 --save-result
With --capacity it searches instead for the highest request rate meeting the SLOs
(simulator/capacity.py), e.g. `--capacity --slo-p99-tbt 0.2 --num-prompts 500`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from csps.bench.workload_args import add_workload_args, workload_config_from_args
from csps.cli import add_engine_args, config_from_args
from csps.simulator.routing import ROUTINGS
from csps.simulator.run import SP_DEGREES


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "simulate", help="Simulate serving a workload on a GPU cluster (the real scheduler, "
                         "simulated time).",
        description="Drive the engine's scheduler and policies with a workload in simulated "
                    "time, priced by a GPU roofline cost model (or a fitted profile), and "
                    "report the metrics of `csps bench serve`.")
    add_engine_args(sim)
    sim.set_defaults(model=None)
    hw = sim.add_argument_group("simulated hardware")
    hw.add_argument("--model", dest="model_option", default=None, metavar="NAME_OR_CONFIG",
                    help="Model shape: a bundled name (llama-2-7b, llama-3-8b, llama-3-8b-262k, "
                         "mistral-7b, yi-34b-200k, llama-3-70b, lwm-text-1m) or a config.json "
                         "(same as the positional MODEL; default: llama-3-8b).")
    hw.add_argument("--cluster", default="8xA100-80GB-nvlink",
                    help="[NODESx]GPUSxGPU[-LINK...] (GPU: A100-40GB, A100-80GB, H100, H200; "
                         "links: nvlink, pcie, ib, ib-hdr, ib-ndr) or a JSON file "
                         "(default: %(default)s).")
    hw.add_argument("--data-parallel-size", "-dp", dest="num_replicas", type=int, default=1,
                    help="Independent SP x TP replicas, requests routed to the least loaded "
                         "(default: %(default)s).")
    hw.add_argument("--routing", choices=ROUTINGS, default="least-loaded",
                    help="Which replica gets a request: the least loaded, or the one sent the "
                         "longest prefix of its trace hash ids before, whose prefix cache "
                         "likely holds it (default: %(default)s).")
    hw.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="Fraction of GPU memory for weights and KV (default: %(default)s).")
    hw.add_argument("--iteration-overhead-ms", type=float, default=None,
                    help="Roofline per-iteration overhead (default: the model's, 1 ms).")
    hw.add_argument("--sp-degrees", choices=SP_DEGREES, default="all",
                    help="SP prefill group sizes policies may pick: all of 1..P, or the "
                         "engine's {1, P} (default: %(default)s).")
    hw.add_argument("--no-predictor", dest="use_predictor", action="store_false",
                    help="Policies plan without the cost model (sps2 keeps its threshold rule).")
    add_workload_args(sim, for_client=False)
    cap = sim.add_argument_group("capacity search (Sarathi-Serve's definition)")
    cap.add_argument("--capacity", action="store_true",
                     help="Instead of one run, find the highest Poisson request rate (same "
                          "workload and seed at every rate; --request-rate is the first probe, "
                          "default 1) meeting --slo-p99-tbt and --slo-median-delay.")
    cap.add_argument("--slo-p99-tbt", type=float, default=None, metavar="SECONDS",
                     help="P99 time between tokens (pooled ITL) SLO; required by --capacity.")
    cap.add_argument("--slo-median-delay", type=float, default=2.0, metavar="SECONDS",
                     help="Median scheduling delay SLO (default: %(default)s).")
    cap.add_argument("--capacity-tol", type=float, default=0.05,
                     help="Relative tolerance of the bisection (default: %(default)s).")
    cap.add_argument("--capacity-max-rate", type=float, default=1e5,
                     help="Stop doubling above this rate (default: %(default)s).")
    out = sim.add_argument_group("results (as csps bench serve)")
    out.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS")
    out.add_argument("--label", default=None, help="Run name (default: sim-POLICY).")
    out.add_argument("--save-result", action="store_true", help="Write the result JSON.")
    out.add_argument("--result-dir", default=".")
    out.add_argument("--result-filename", default=None)
    out.add_argument("--plot", default=None, help="PNG (default: beside a saved result).")
    out.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    sim.set_defaults(handler=simulate_command, parser=sim)


def simulate_command(args: argparse.Namespace) -> int:
    try:
        return run_simulate(args)
    except ValueError as exc:
        args.parser.error(str(exc))  # exits with status 2
    except (OSError, RuntimeError) as exc:
        print(f"csps simulate: error: {exc}", file=sys.stderr)
    return 1


def run_simulate(args: argparse.Namespace) -> int:
    from datetime import datetime

    from tqdm import tqdm

    from csps.bench.metrics import GoodputSLOs
    from csps.bench.plots import has_matplotlib, plot_run
    from csps.bench.report import default_filename, format_summary, save_result
    from csps.bench.workload import build_workload
    from csps.simulator.prompt_tokens import hash_block_tokens
    from csps.simulator.run import SimulationConfig, simulate

    model = args.model_option or args.model or "llama-3-8b"
    args.model = model
    engine = config_from_args(args)
    workload = workload_config_from_args(args)
    overhead = None if args.iteration_overhead_ms is None else args.iteration_overhead_ms / 1e3
    config = SimulationConfig(engine, model, args.cluster, args.num_replicas,
                              args.gpu_memory_utilization, overhead, args.sp_degrees,
                              args.use_predictor, args.max_concurrency,
                              hash_block_tokens(workload.length_scale), args.routing)
    label = args.label or f"sim-{engine.scheduler.policy}"
    if args.capacity:
        return run_capacity(args, config, workload, label)
    specs = build_workload(workload)
    bar = tqdm(total=len(specs), desc="simulated requests", unit="req",
               disable=args.disable_tqdm)
    result = simulate(config, specs, GoodputSLOs.parse(args.goodput),
                      on_request_done=lambda record: bar.update(1))
    bar.close()
    rate = args.request_rate if args.request_rate is not None else math.inf
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "label": label,
              "model_id": model, "num_prompts": len(specs), "request_rate": rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, **result}
    result["config"]["args"] = {k: v for k, v in vars(args).items()
                                if k not in ("handler", "parser")}
    print(format_summary(result))
    sim = result["simulator"]
    print(f"simulated {sim['simulated_s']:.1f} s in {sim['wall_s']:.1f} s of wall time, "
          f"{sim['iterations']} iterations {sim['iterations_by_kind']}, "
          f"{sim['num_preemptions']} preemptions; prefix cache: {result['prefix_cache_hits']} "
          f"of {result['prefix_cache_queries']} prompt tokens hit "
          f"({100 * result['prefix_cache_hit_rate']:.1f}%)")
    plot_path = args.plot
    if args.save_result:
        filename = args.result_filename or default_filename(label, args.request_rate,
                                                            args.max_concurrency, model)
        saved = save_result(result, args.result_dir, filename)
        print(f"result: {saved}")
        plot_path = plot_path or saved.with_suffix(".png")
    if plot_path and has_matplotlib():
        print(f"plot: {plot_run(result, plot_path, title=f'{label}: {model} (simulated)')}")
    elif plot_path:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0 if result["completed"] else 1


def run_capacity(args: argparse.Namespace, config, workload, label: str) -> int:
    """`--capacity`: one progress line per probe; the search's JSON printed, or saved with
    --save-result."""
    import json
    from datetime import datetime

    from csps.bench.report import save_result
    from csps.simulator.capacity import (
        CapacitySearch,
        CapacitySLOs,
        find_capacity,
        simulation_probe,
    )

    if args.slo_p99_tbt is None:
        raise ValueError("--capacity needs --slo-p99-tbt SECONDS")
    start = args.request_rate if args.request_rate and math.isfinite(args.request_rate) else 1.0
    slos = CapacitySLOs(args.slo_p99_tbt, args.slo_median_delay)
    search = CapacitySearch(start_rate=start, rel_tol=args.capacity_tol,
                            max_rate=max(start, args.capacity_max_rate))

    def progress(entry: dict) -> None:
        m = entry["metrics"]
        print(f"rate {entry['rate']:10.4g} req/s: p99 TBT {m['p99_itl_ms']:9.1f} ms, median "
              f"scheduling delay {m['median_sched_delay_ms']:9.1f} ms, {m['completed']} done "
              f"in {m.get('wall_s', 0.0):.1f} s -> {'pass' if entry['passed'] else 'FAIL'}",
              flush=True)

    found = find_capacity(simulation_probe(config, workload), slos, search, progress)
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "label": label,
              "model_id": config.model, "num_prompts": workload.num_prompts, **found,
              "config": {"engine": config.engine.to_dict(),
                         "workload": dataclasses.asdict(workload)}}
    low, high = found["bracket"]
    print(f"capacity: {found['capacity']:.4g} req/s (passes at {low}, fails at {high}; "
          f"{found['num_probes']} probes)")
    if args.save_result:
        filename = args.result_filename or f"capacity-{label}-{result['date']}.json"
        print(f"result: {save_result(result, args.result_dir, filename)}")
    else:
        print(json.dumps(result, indent=1))
    return 0 if found["capacity"] > 0 else 1
