"""Automatic prefix caching in the simulator (issue 14): simulated 8xA100-80GB (NVLink) serving
Llama-3-8B-262K on a slice of the Mooncake conversation trace, sarathi and sps2, each with and
without the prefix cache, through `csps simulate`'s API (the real schedulers and KV books, the
GPU roofline's time; docs/prefix_caching.md).

    nice -n 10 .venv/bin/python benchmarks/prefix_cache_sim.py \
        --trace ../shared/data/traces/mooncake_conversation.jsonl

Workload: the trace's first --num-prompts requests at their native lengths (prompt ids shared
exactly where their hash ids agree: simulator/prompt_tokens.py), arriving at the trace's own
times x --time-scale (the gaps between a conversation's turns decide whether a turn's prefix
is cached when the next one comes). Reported: (a) each caching run's hit rate (prefix-cache
hit tokens / prompt tokens looked up) against the reuse computed from the hash ids alone
(bench/trace_reuse.py; also at the cache's granularity: whole 16-token blocks, the last
prompt token recomputed) and (b) TTFT, TBT (inter-token gaps, pooled) and E2E latency per run.
Written to --out-dir: summary.json, summary.md, prefix_cache_sim.png, commands.txt, and
runs/LABEL.json (each a `csps bench serve` result without its per-request ITLs; not
committed, the simulator being deterministic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from csps.bench.trace_reuse import reuse_of
from csps.bench.workload import WorkloadConfig, build_workload
from csps.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from csps.costmodel.hardware import ClusterSpec
from csps.simulator.prompt_tokens import hash_block_tokens
from csps.simulator.run import SimulationConfig, simulate

MODEL, CLUSTER, CONTEXT = "llama-3-8b-262k", "8xA100-80GB-nvlink", 262_144
BIG_MEMORY = 8  # the hit-rate check's GPUs: A100-80GB x this much memory, all else the same


@dataclass(frozen=True)
class Run:
    """One simulated deployment; layouts as benchmarks/cluster_study.py's one-node runs."""

    policy: str
    sp: int  # SP size of a replica
    replicas: int
    caching: bool  # CacheConfig.enable_prefix_caching
    routing: str = "least-loaded"  # which replica gets a request (simulator/routing.py)
    big_memory: bool = False  # GPUs with BIG_MEMORY x the memory: a cache that keeps all
    parallel: dict = field(default_factory=dict)  # ParallelConfig extras
    scheduler: dict = field(default_factory=dict)  # SchedulerConfig extras


_SARATHI = {"max_num_batched_tokens": 512}  # Sarathi-Serve's strict budget
_DENSE, _CSA = {"sp_attention": "ulysses"}, {"sp_attention": "csa"}
RUNS = {
    "sarathi": Run("sarathi", 1, 8, False, scheduler=_SARATHI),
    "sarathi+cache": Run("sarathi", 1, 8, True, scheduler=_SARATHI),
    # each replica has its own cache: send a conversation's turns to the one holding it
    "sarathi+cache+prefix-routing": Run("sarathi", 1, 8, True, "prefix", scheduler=_SARATHI),
    # dense Ulysses: exact attention, so its KV may serve other requests
    "sps2": Run("sps2", 8, 1, False, parallel=_DENSE),
    "sps2+cache": Run("sps2", 8, 1, True, parallel=_DENSE),
    # the hit-rate check: a cache that evicts nothing this trace slice reuses (times not A100's)
    f"sps2+cache+{BIG_MEMORY}x-memory": Run("sps2", 8, 1, True, big_memory=True,
                                              parallel=_DENSE),
    # CSA's sparse SP prefills compute KV that exact attention would not: never cached
    "sps2-csa": Run("sps2", 8, 1, False, parallel=_CSA),
    "sps2-csa+cache": Run("sps2", 8, 1, True, parallel=_CSA),
}
METRICS = {  # summary key -> result key
    "ttft_mean_s": "mean_ttft_ms", "ttft_p50_s": "median_ttft_ms", "ttft_p99_s": "p99_ttft_ms",
    "tbt_mean_s": "mean_itl_ms", "tbt_p99_s": "p99_itl_ms",
    "e2e_mean_s": "mean_e2el_ms", "e2e_p50_s": "median_e2el_ms", "e2e_p99_s": "p99_e2el_ms"}


def big_memory_cluster(out_dir: Path) -> str:
    """A JSON cluster: CLUSTER with BIG_MEMORY x the GPU memory (the hit-rate check's)."""
    cluster = ClusterSpec.parse(CLUSTER).to_dict()
    cluster["gpu"]["memory_bytes"] *= BIG_MEMORY
    cluster["name"] = f"{CLUSTER}-{BIG_MEMORY}x-memory"
    path = out_dir / f"{cluster['name']}.json"
    path.write_text(json.dumps(cluster, indent=1) + "\n")
    return str(path)


def sim_config(run: Run, block_tokens: int, out_dir: Path) -> SimulationConfig:
    engine = EngineConfig(cache=CacheConfig(enable_prefix_caching=run.caching),
                          scheduler=SchedulerConfig(policy=run.policy, **run.scheduler),
                          parallel=ParallelConfig(sequence_parallel_size=run.sp, **run.parallel))
    cluster = big_memory_cluster(out_dir) if run.big_memory else CLUSTER
    return SimulationConfig(engine, model=MODEL, cluster=cluster, num_replicas=run.replicas,
                            hash_block_tokens=block_tokens, routing=run.routing)


def run_summary(result: dict, promised: tuple[int, ...]) -> dict:
    """The run's figures; `promised`: each request's cacheable reuse from the hash ids, against
    which its `cached_tokens` (its first admission's hit) falls short or not."""
    row = {key: result[source] / 1e3 for key, source in METRICS.items()}
    row.update({key: result[key] for key in ("completed", "failed", "prefix_cache_queries",
                                             "prefix_cache_hits", "prefix_cache_hit_rate")})
    short = [(p, c or 0) for p, c in zip(promised, result["cached_tokens"], strict=True)
             if (c or 0) < p]
    row.update(requests_short_of_reuse=len(short),
               tokens_short_of_reuse=sum(p - c for p, c in short),
               requests_short_with_no_hit=sum(1 for _, c in short if c == 0))
    sim = result["simulator"]
    row.update(preemptions=sim["num_preemptions"], simulated_s=sim["simulated_s"],
               wall_s=sim["wall_s"])
    return row


def markdown(rows: dict[str, dict], reuse: dict) -> str:
    lines = ["| run | hit rate | requests (tokens) short of the reuse "
             "| TTFT mean / P50 / P99 (s) | TBT mean / P99 (ms) "
             "| E2E mean / P50 / P99 (s) | preemptions |", "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        short = (f"{r['requests_short_of_reuse']} ({r['tokens_short_of_reuse']:,})"
                 if RUNS[label].caching else "-")
        lines.append(
            f"| {label} | {100 * r['prefix_cache_hit_rate']:.2f}% | {short} "
            f"| {r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} "
            f"| {1e3 * r['tbt_mean_s']:.1f} / {1e3 * r['tbt_p99_s']:.1f} "
            f"| {r['e2e_mean_s']:.2f} / {r['e2e_p50_s']:.2f} / {r['e2e_p99_s']:.2f} "
            f"| {r['preemptions']} |")
    lines.append(f"\nReuse from the hash ids: {100 * reuse['reuse_rate']:.2f}% of prompt tokens "
                 f"({100 * reuse['cacheable_rate']:.2f}% at the cache's granularity: whole "
                 f"16-token blocks, the last prompt token recomputed); {reuse['num_requests']} "
                 f"requests, {reuse['request_rate']:.2f} req/s.")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], reuse: dict, path: Path) -> None:
    """Hit rates against the trace's reuse; TTFT, TBT and E2E per run (mean bars, P50 lighter
    beside them; P99s are in summary.md; the big-memory check left out). Colour by policy,
    hatched with the cache on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, labels: list[str], values: list[float], offset: float = 0.0,
             width: float = 0.8, alpha: float = 1.0) -> None:
        for x, (label, value) in enumerate(zip(labels, values, strict=True)):
            run = RUNS[label]
            color = "C0" if run.policy == "sarathi" else (
                "C2" if run.parallel.get("sp_attention") == "csa" else "C1")
            ax.bar(x + offset, value, width, color=color, alpha=alpha, edgecolor="black",
                   hatch="//" if run.caching else None, linewidth=0.5)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=7)

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6))
    labels = list(rows)
    bars(axes[0], labels, [100 * rows[k]["prefix_cache_hit_rate"] for k in labels])
    axes[0].axhline(100 * reuse["reuse_rate"], color="black", linestyle="--",
                    label="reuse from hash ids")
    axes[0].set(title="prefix-cache hit rate", ylabel="% of prompt tokens looked up")
    axes[0].legend(fontsize=7)
    timed = [k for k in labels if not RUNS[k].big_memory]
    for ax, (name, mean, p50, scale, unit) in zip(axes[1:], [
            ("TTFT", "ttft_mean_s", "ttft_p50_s", 1, "s"),
            ("TBT", "tbt_mean_s", None, 1e3, "ms"),
            ("E2E latency", "e2e_mean_s", "e2e_p50_s", 1, "s")], strict=True):
        if p50 is None:
            bars(ax, timed, [scale * rows[k][mean] for k in timed])
            ax.set(title=f"{name}: mean", ylabel=unit)
            continue
        bars(ax, timed, [scale * rows[k][mean] for k in timed], -0.2, 0.4)
        bars(ax, timed, [scale * rows[k][p50] for k in timed], 0.2, 0.4, alpha=0.45)
        ax.set(title=f"{name}: mean (left), P50 (right, light)", ylabel=unit)
    fig.suptitle(f"simulated {CLUSTER}, {MODEL}, Mooncake conversation: first "
                 f"{reuse['num_requests']} requests, {reuse['request_rate']:.2f} req/s "
                 f"(blue sarathi, orange sps2, green sps2 with CSA; "
                 f"hatched: prefix cache on)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", required=True)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--time-scale", type=float, default=1.5,
                        help="multiplies the trace's inter-arrival times (1.5: ~2 req/s)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out-dir", type=Path,
                        default=Path("benchmarks/results/prefix_cache_sim"))
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plot from --out-dir/summary.json")
    args = parser.parse_args()
    if args.plot_only:
        summary = json.loads((args.out_dir / "summary.json").read_text())
        plot(summary["runs"], summary["trace_reuse"], args.out_dir / "prefix_cache_sim.png")
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "commands.txt", "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M')}\n{' '.join(sys.argv)}\n")
    workload = WorkloadConfig(dataset_name="trace", dataset_path=args.trace,
                              num_prompts=args.num_prompts, time_scale=args.time_scale,
                              max_input_len=CONTEXT - 4096)
    specs = build_workload(workload)
    block_tokens = hash_block_tokens(workload.length_scale)
    pairs = [(s.input_len, s.hash_ids) for s in specs]
    plain, cacheable = reuse_of(pairs, block_tokens), reuse_of(pairs, block_tokens, 16)
    reuse = {**dataclasses.asdict(plain), "reuse_rate": plain.reuse_rate,
             "cacheable_tokens": cacheable.reused_tokens, "cacheable_rate": cacheable.reuse_rate,
             "num_requests": len(specs), "hash_block_tokens": block_tokens,
             "request_rate": len(specs) / specs[-1].arrival_s}
    del reuse["reused_per_request"]  # per request: 1000 numbers, in no table
    print(f"{len(specs)} requests over {specs[-1].arrival_s:.0f} s "
          f"({reuse['request_rate']:.2f} req/s); reuse from hash ids "
          f"{100 * plain.reuse_rate:.2f}% ({100 * cacheable.reuse_rate:.2f}% cacheable)",
          flush=True)
    rows: dict[str, dict] = {}
    (args.out_dir / "runs").mkdir(exist_ok=True)
    for label in args.runs:
        result = simulate(sim_config(RUNS[label], block_tokens, args.out_dir), specs)
        result.pop("itls", None)
        result.pop("scheduling_delays", None)
        result["config"]["workload"] = dataclasses.asdict(workload)
        (args.out_dir / "runs" / f"{label}.json").write_text(json.dumps(result) + "\n")
        rows[label] = run_summary(result, cacheable.reused_per_request)
        r = rows[label]
        print(f"{label}: hit rate {100 * r['prefix_cache_hit_rate']:.2f}%, TTFT mean "
              f"{r['ttft_mean_s']:.2f} s P99 {r['ttft_p99_s']:.2f} s, TBT mean "
              f"{1e3 * r['tbt_mean_s']:.1f} ms, E2E mean {r['e2e_mean_s']:.2f} s, "
              f"{r['completed']} done ({r['wall_s']:.0f} s)", flush=True)
    summary = {"workload": dataclasses.asdict(workload), "model": MODEL, "cluster": CLUSTER,
               "trace_reuse": reuse, "runs": rows}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out_dir / "summary.md").write_text(markdown(rows, reuse))
    print(markdown(rows, reuse))
    plot(rows, reuse, args.out_dir / "prefix_cache_sim.png")


if __name__ == "__main__":
    main()
