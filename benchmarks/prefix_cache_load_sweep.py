"""Prefix caching on the real server over a load sweep (issue 14): the prefix_cache_server
replay (2 workers, sps2, Mooncake conversations at the trace's own reuse) at several time
scales, each load with and without the cache side by side, so the gain can be read against
the load it was measured at.

    .venv/bin/python benchmarks/prefix_cache_load_sweep.py \
        --trace ../shared/data/traces/mooncake_conversation.jsonl \
        --time-scales 0.1,0.07,0.06 --out-dir benchmarks/results/prefix_cache_load_sweep

A smaller time scale packs the same requests into less time (0.07 is prefix_cache_server's
default). At each load the two servers run one after the other on the same replay; the order
alternates between loads so a slow drift of the machine does not favour one side. Each
load's bench JSON lies in its own folder (ts-<scale>/); summary.json and summary.md hold one
row per load, with the seconds each server ran past the last arrival (how far behind it
fell), and speedup.png plots the mean and median TTFT gain against the offered load.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from prefix_cache_server import SERVERS, conversation_subset, run_one, summary

from csps.bench.trace_reuse import trace_reuse
from csps.bench.traces import MOONCAKE_BLOCK_TOKENS, read_trace, scale_records


def lag_s(result: dict, span_s: float) -> float:
    """Seconds the run lasted beyond the last arrival: how far the server fell behind."""
    return result["duration"] - span_s


def sweep_row(scale: float, results: dict[str, dict], reuse: float, span_s: float) -> dict:
    data = summary(results, reuse)
    return {"time_scale": scale, "arrival_span_s": span_s,
            "request_rate": results["sps2-cache"]["completed"] / span_s,
            "mean_ttft_speedup": data["mean_ttft_speedup"],
            "median_ttft_speedup": data["median_ttft_speedup"],
            "mean_e2el_speedup": data["mean_e2el_speedup"],
            "lag_s": {label: lag_s(r, span_s) for label, r in results.items()},
            "rows": data["rows"]}


def markdown(rows: list[dict], reuse: float) -> str:
    lines = [f"workload reuse (from hash_ids): {reuse:.1%}", "",
             "| time scale | req/s | mean TTFT s cache / none | gain mean | gain P50 | "
             "hit rate | lag s cache / none |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cache, plain = row["rows"]["sps2-cache"], row["rows"]["sps2-no-cache"]
        lag = row["lag_s"]
        lines.append(f"| {row['time_scale']} | {row['request_rate']:.2f} | "
                     f"{cache['mean_ttft_s']:.2f} / {plain['mean_ttft_s']:.2f} | "
                     f"{row['mean_ttft_speedup']:.2f}x | {row['median_ttft_speedup']:.2f}x | "
                     f"{cache['prefix_cache_hit_rate']:.1%} | "
                     f"{lag['sps2-cache']:.1f} / {lag['sps2-no-cache']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [row["request_rate"] for row in rows]
    for key, label in (("mean_ttft_speedup", "mean TTFT"), ("median_ttft_speedup", "P50 TTFT")):
        ax.plot(rates, [row[key] for row in rows], marker="o", label=label)
    ax.axhline(2.0, color="grey", linestyle=":", label="target 2x")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("no cache / cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--time-scales", default="0.1,0.07,0.06")
    parser.add_argument("--conversation-stride", type=int, default=100)
    parser.add_argument("--conversation-offset", type=int, default=40)
    parser.add_argument("--length-scale", type=float, default=1 / 32)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--out-dir", type=Path,
                        default=Path("benchmarks/results/prefix_cache_load_sweep"))
    args = parser.parse_args()
    subset = conversation_subset(Path(args.trace).read_text().splitlines(),
                                 args.conversation_stride, args.conversation_offset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "conversations.jsonl"
        workload.write_text("\n".join(subset) + "\n")
        records = read_trace(workload)
        block = max(1, round(MOONCAKE_BLOCK_TOKENS * args.length_scale))
        reuse = trace_reuse(scale_records(records, length_scale=args.length_scale), block)
        for i, scale in enumerate(float(s) for s in args.time_scales.split(",")):
            run_args = copy.copy(args)
            run_args.time_scale, run_args.out_dir = scale, args.out_dir / f"ts-{scale}"
            run_args.out_dir.mkdir(parents=True, exist_ok=True)
            arrivals = [r.timestamp_s for r in scale_records(records, time_scale=scale)]
            labels = list(SERVERS) if i % 2 == 0 else list(reversed(SERVERS))
            with open(run_args.out_dir / "commands.txt", "a") as log:
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M')} time scale {scale}\n")
                results = {label: run_one(label, workload, run_args, log) for label in labels}
            rows.append(sweep_row(scale, results, reuse, max(arrivals) - min(arrivals)))
            print(markdown(rows, reuse), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(
        {"trace_reuse": reuse, "requests": len(subset), "loads": rows}, indent=1) + "\n")
    (args.out_dir / "summary.md").write_text(markdown(rows, reuse) + "\n")
    plot(rows, args.out_dir / "speedup.png")


if __name__ == "__main__":
    main()
