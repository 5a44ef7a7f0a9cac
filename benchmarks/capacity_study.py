"""Capacity under Sarathi-Serve's definition (issue 12): the highest Poisson request rate whose
P99 TBT (pooled ITL) and median scheduling delay stay under the SLOs, per policy, on the
cluster study's long-document workload (benchmarks/cluster_study.py: prompts log-uniform in
16k-200k tokens, outputs 100-500), simulated on one 8xA100 NVLink node.

    nice -n 10 .venv/bin/python benchmarks/capacity_study.py \
        --out-dir benchmarks/results/capacity_study

Each probe is one full simulation of the same workload (same lengths and seed) at the probed
rate (csps/simulator/capacity.py); probes are shared between the SLOs of one policy. Writes
capacity.json (per model, policy and SLO: the capacity, its bracket and every probe),
capacity.md and capacity.png to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cluster_study import lengths, sim_config, specs_at  # noqa: E402

from csps.simulator.capacity import PROBE_KEYS, CapacitySearch, CapacitySLOs, find_capacity
from csps.simulator.run import simulate

# P99 TBT SLOs of algorithms.md §3 (strict, relaxed): 7B-class for the 8B, Yi-34B's own
SLOS = {"llama-3-8b-262k": (0.1, 0.5), "yi-34b-200k": (0.2, 1.0)}


def capacities(model: str, label: str, num: int, start_rate: float) -> list[dict]:
    pairs = lengths("longdoc", model, num, "")
    config = sim_config("1x8-nvlink", model, label)
    seen: dict[float, dict] = {}

    def probe(rate: float) -> dict:
        if rate not in seen:
            began = time.perf_counter()
            result = simulate(config, specs_at(pairs, rate))
            seen[rate] = {k: result[k] for k in PROBE_KEYS}
            print(f"  {model} {label} {rate:.4g} req/s: P99 ITL {seen[rate]['p99_itl_ms']:.0f} "
                  f"ms, median delay {seen[rate]['median_sched_delay_ms'] / 1e3:.2f} s "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
        return seen[rate]

    out = []
    for slo in SLOS[model]:
        found = find_capacity(probe, CapacitySLOs(slo), CapacitySearch(start_rate, rel_tol=0.1))
        out.append({"model": model, "policy": label, "p99_tbt_slo_s": slo,
                    "capacity": found["capacity"], "bracket": found["bracket"],
                    "probes": found["probes"]})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["model"], r["p99_tbt_slo_s"]) for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(keys), 3.4))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        values = [next((r["capacity"] for r in rows if (r["model"], r["p99_tbt_slo_s"]) == k
                        and r["policy"] == policy), 0.0) for k in keys]
        ax.bar([j + (i - 0.5 * (len(policies) - 1)) * width for j in range(len(keys))], values,
               width, label=policy)
    ax.set_xticks(range(len(keys)), [f"{m}\nP99 TBT <= {s} s" for m, s in keys], fontsize=7)
    ax.set_ylabel("capacity (req/s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama-3-8b-262k"], choices=list(SLOS))
    parser.add_argument("--policies", nargs="+", default=["sarathi", "sps2", "sps2-kvc"])
    parser.add_argument("--num-longdoc", type=int, default=100)
    parser.add_argument("--start-rate", type=float, default=0.1)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/capacity"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "commands.txt", "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M')}\n{' '.join(sys.argv)}\n")
    rows = []
    for model in args.models:
        for label in args.policies:
            rows += capacities(model, label, args.num_longdoc, args.start_rate)
            (args.out_dir / "capacity.json").write_text(json.dumps(rows, indent=1) + "\n")
    base = {(r["model"], r["p99_tbt_slo_s"]): r["capacity"] for r in rows
            if r["policy"] == "sarathi"}
    lines = ["| model | P99 TBT SLO | policy | capacity (req/s) | vs sarathi |", "|---" * 5 + "|"]
    for r in rows:
        ref = base.get((r["model"], r["p99_tbt_slo_s"]))
        ratio = f"{r['capacity'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['model']} | {r['p99_tbt_slo_s']} s | {r['policy']} | "
                     f"{r['capacity']:.4g} | {ratio} |")
    (args.out_dir / "capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, args.out_dir / "capacity.png")


if __name__ == "__main__":
    main()
