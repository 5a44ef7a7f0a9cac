"""LoongServe's own evaluation setting, simulated (docs/loongserve.md, section 2): LWM-Text-1M on
8 A100-80GB NVLink (our nearest to their A800s), workloads shaped like ShareGPT, L-Eval,
LV-Eval and their 1:1:1 mix (csps/bench/length_workloads.py); per policy, the highest Poisson
rate whose mean latency / (prompt + output tokens) meets LoongServe's SLO for the workload.

    nice -n 19 .venv/bin/python benchmarks/loongserve_study.py

Policies (LAYOUTS): sarathi (budget --sarathi-budget, one TP 8 instance, as LoongServe's
chunked-prefill baseline ran), sps2 (SP 4 x TP 2, CSA) and loongserve (SP 4 x TP 2, ring).
Search: csps.simulator.capacity.find_capacity with LoongServeSLO. A probe replays the seeded
pool (traces/, at 1 req/s) scaled to its rate, as many requests as arrive in the workload's
span (SPAN_S; LoongServe's runs span ~1000 s); a mean over a finite span cannot show a queue
outgrowing it, so a probe must also drain (requests / duration >= DRAIN x the arrivals' rate,
as realised) and lose no request. summary.json (with the commit run), summary.md, PNG: --out-dir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from csps.bench.length_workloads import WORKLOADS, trace_rows, write_trace
from csps.bench.workload import RequestSpec
from csps.config import EngineConfig, ParallelConfig, SchedulerConfig
from csps.costmodel.models import max_position_embeddings
from csps.simulator.capacity import CapacitySearch, find_capacity, probe_metrics
from csps.simulator.run import SimulationConfig, simulate

MODEL, CLUSTER = "lwm-text-1m", "8xA100-80GB-nvlink"
# LoongServe's SLOs in ms (test/longserve/ae-plot-fig-10-11-12.py, draw_fig_10): per workload
# (avg token latency, avg input-token latency, avg output-token latency = mean TPOT).
SLOS_MS = {"sharegpt": (92.0, 20.0, 320.0), "leval": (3.5, 1.8, 320.0),
           "lveval": (2.5, 2.5, 365.0), "mixed": (70.0, 90.0, 360.0)}
METRICS = ("mean_normalized_latency_ms", "mean_ttft_per_input_token_ms", "mean_tpot_ms")
SPAN_S = {"sharegpt": 40.0, "leval": 200.0, "lveval": 500.0, "mixed": 400.0}
NUM_PROMPTS = {"sharegpt": 2000, "leval": 1500, "lveval": 300, "mixed": 600}  # pool (cap)
START_RATE = {"sharegpt": 8.0, "leval": 1.0, "lveval": 0.1, "mixed": 0.2}
MIN_PROMPTS, DRAIN = 30, 0.8
LAYOUTS = {"sarathi": (1, 8, {}, {}),  # policy -> (SP, TP, ParallelConfig, SchedulerConfig)
           "sps2": (4, 2, {"sp_attention": "csa"}, {}),
           "loongserve": (4, 2, {"sp_attention": "ring"}, {"loongserve_sp_batch": 0}),
           # the policy before per-instance steps (issue 13's "before" row)
           "loongserve-lockstep": (4, 2, {"sp_attention": "ring"},
                                   {"loongserve_sp_batch": 0, "lockstep": True})}
POLICIES = tuple(LAYOUTS)


@dataclass(frozen=True, slots=True)
class LoongServeSLO:
    """Pass: no request failed, mean normalised latency <= the SLO, and the run drained."""
    token_latency_ms: float
    drain: float = DRAIN

    def __post_init__(self) -> None:
        if not self.token_latency_ms > 0 or not 0 <= self.drain <= 1:
            raise ValueError(f"need SLO > 0 and drain in [0, 1], got {self.token_latency_ms}")

    def is_met(self, metrics: dict) -> bool:
        return (metrics["completed"] > 0 and metrics["failed"] == 0
                and metrics["mean_normalized_latency_ms"] <= self.token_latency_ms
                and metrics["request_throughput"] >= self.drain * metrics["offered_rate"])


def sim_config(policy: str, sarathi_budget: int) -> SimulationConfig:
    sp, tp, parallel, scheduler = LAYOUTS[policy]
    if policy == "sarathi":
        scheduler = {"max_num_batched_tokens": sarathi_budget}
    engine = EngineConfig(scheduler=SchedulerConfig(policy=policy.split("-")[0], **scheduler),
                          parallel=ParallelConfig(sequence_parallel_size=sp,
                                                  tensor_parallel_size=tp, **parallel))
    return SimulationConfig(engine, model=MODEL, cluster=CLUSTER, sp_degrees="all")


def probe_for(config: SimulationConfig, rows: list[dict], span_s: float):
    """At rate r: the first r x span_s rows (1 req/s; >= MIN_PROMPTS), arrivals divided by r."""
    def probe(rate: float) -> dict:
        num = min(len(rows), max(MIN_PROMPTS, int(rate * span_s + 0.5)))
        result = simulate(config, [RequestSpec(r["timestamp"] / 1000.0 / rate, r["input_length"],
                                               r["output_length"]) for r in rows[:num]])
        last_s = rows[num - 1]["timestamp"] / 1000.0 / rate  # realised: this seed's arrivals
        return {**probe_metrics(result), **{k: result[k] for k in METRICS}, "num_prompts": num,
                "offered_rate": (num - 1) / last_s if last_s > 0 else rate}
    return probe


def interpolated(search: dict, slo_ms: float) -> float | None:
    """LoongServe's reading: where the metric's line between the bracket's ends crosses the
    SLO (test/longserve/ae-plot-fig-10-11-12.py get_intersection_point)."""
    low, high = search["bracket"]
    at = {p["rate"]: p["metrics"]["mean_normalized_latency_ms"] for p in search["probes"]}
    if low is None or high is None or not at[low] < slo_ms < at[high]:
        return low  # no bracket, or its fail was not the SLO's (a failed request, no drain)
    return low + (high - low) * (slo_ms - at[low]) / (at[high] - at[low])


def git_state() -> dict:
    import csps
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(Path(__file__).parent), *args],
                              capture_output=True, text=True).stdout.strip()
    snapshot = Path(csps.__file__).parents[1] / "COMMIT"  # a `git archive` copy of csps/
    if snapshot.exists():
        return {"commit": snapshot.read_text().strip(), "csps_imported_from": csps.__file__}
    return {"commit": git("rev-parse", "HEAD"), "csps_imported_from": csps.__file__,
            "dirty_csps": git("status", "--porcelain", "csps").splitlines()}


def markdown(table: dict) -> str:
    policies = list(next(iter(table.values())))
    lines = ["| workload | SLO ms/token | " + " | ".join(f"{p} req/s (x sarathi)"
                                                     for p in policies) + " |",
             "|---" * (len(policies) + 2) + "|"]
    for workload, row in table.items():
        cells = " | ".join(f"{row[p]['max_throughput']:.3g} "
                           f"({row[p]['ratio_vs_sarathi'] or 0:.2f}x)" for p in policies)
        lines.append(f"| {workload} | {SLOS_MS[workload][0]:g} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    policies = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        xs = [j + (i - 0.5 * (len(policies) - 1)) * width for j in range(len(table))]
        bars = ax.bar(xs, [max(row[policy]["max_throughput"], 1e-3) for row in table.values()],
                      width, label=policy, color=f"C{i}")
        ax.bar_label(bars, [f"{row[policy]['ratio_vs_sarathi'] or 0:.2f}x"
                            for row in table.values()], fontsize=6)
    ax.set_xticks(range(len(table)), list(table))
    ax.set_yscale("log")
    ax.set_ylabel("max req/s within LoongServe's SLO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_probe(workload: str, policy: str):
    def log(p: dict) -> None:
        m = p["metrics"]
        print(f"{workload} {policy} {p['rate']:.4g} req/s: {m['mean_normalized_latency_ms']:.3g}"
              f" ms/token, {m['request_throughput']:.3g} done/s {p['passed']}", flush=True)
    return log


def study_workload(args: argparse.Namespace, workload: str, context: int) -> dict:
    """Per policy: the search's result, max_throughput and ratio_vs_sarathi."""
    rows = trace_rows(workload, args.num_prompts or NUM_PROMPTS[workload], 1.0, context, args.seed)
    write_trace(args.out_dir / "traces" / f"{workload}.jsonl", rows)
    slo, span = LoongServeSLO(SLOS_MS[workload][0]), SPAN_S[workload] * args.span_scale
    search = CapacitySearch(start_rate=START_RATE[workload], rel_tol=args.rel_tol)
    row = {}
    for policy in args.policies:
        start = time.perf_counter()
        found = find_capacity(probe_for(sim_config(policy, args.sarathi_budget), rows, span),
                              slo, search, on_probe=log_probe(workload, policy))
        row[policy] = {"max_throughput": found["capacity"],
                       "interpolated": interpolated(found, slo.token_latency_ms),
                       "span_s": span, "wall_s": time.perf_counter() - start, **found}
    base = row.get("sarathi", {}).get("max_throughput")
    for entry in row.values():
        entry["ratio_vs_sarathi"] = entry["max_throughput"] / base if base else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help=f"most requests per probe (default per workload: {NUM_PROMPTS})")
    parser.add_argument("--span-scale", type=float, default=1.0,
                        help=f"arrival span per probe, x the default {SPAN_S} s")
    parser.add_argument("--rel-tol", type=float, default=0.05, help="bisection tolerance")
    parser.add_argument("--sarathi-budget", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results" /
                        "loongserve_study")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"git": git_state(), "model": MODEL, "cluster": CLUSTER,
               "args": {k: str(v) for k, v in vars(args).items()},
               "slos_ms": {w: dict(zip(METRICS, SLOS_MS[w], strict=True)) for w in SLOS_MS},
               "workloads": {}}
    for workload in args.workloads:
        summary["workloads"][workload] = study_workload(args, workload,
                                                        max_position_embeddings(MODEL))
        (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out_dir / "summary.md").write_text(markdown(summary["workloads"]))
    plot(summary["workloads"], args.out_dir / "throughput.png")
    print(markdown(summary["workloads"]))


if __name__ == "__main__":
    sys.exit(main())
