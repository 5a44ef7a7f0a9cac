"""Prefix caching on the real server (issue 14): 2 workers under sps2 on a Mooncake conversation
workload with the trace's own prefix reuse, mean TTFT with caching vs without, in one run.

    .venv/bin/python benchmarks/prefix_cache_server.py \
        --trace ../shared/data/traces/mooncake_conversation.jsonl \
        --out-dir benchmarks/results/prefix_cache_server

The workload is whole conversations of the trace: a conversation is the requests whose second
hash id agree (the first, id 0, is the system prompt every request shares), and every
--conversation-stride-th conversation in order of first appearance (from the
--conversation-offset-th on) is kept with all its turns,
at their own timestamps (x --time-scale) and lengths (x --length-scale; a 512-token hash block
becomes 512 x length-scale tokens). So each follow-up resends its conversation's history as
the trace says, and the reuse is the trace's own within conversations (printed, computed from
hash_ids by csps.bench.trace_reuse); the sharing between conversations beyond the system
prompt is lost with the sampling. The subset is written to a temporary file (the trace is not
copied into the repository). Each configuration of SERVERS gets its own `csps serve` (one at a
time) and the same `csps bench serve` replay; the summary (JSON, Markdown, PNG: the TTFT
distributions) compares them. Every command is written to commands.txt.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from policy_study import _wait_healthy  # the sibling script (run from benchmarks/)

from csps.bench.trace_reuse import trace_reuse
from csps.bench.traces import MOONCAKE_BLOCK_TOKENS, read_trace, scale_records
from csps.parallel.groups import find_free_port

PROFILE = "csps/costmodel/profiles/cpu-smollm2-135m-sp2.json"
_SPS2 = ["-sp", "2", "--scheduler", "sps2", "--cost-model", PROFILE]
SERVERS = {"sps2-cache": _SPS2, "sps2-no-cache": [*_SPS2, "--no-enable-prefix-caching"]}


def conversation_subset(lines: list[str], stride: int, offset: int = 0) -> list[str]:
    """The trace lines of the conversations whose index (in order of first appearance) is
    `offset` modulo `stride`, with all their turns, in trace order."""
    keys, chosen = {}, []
    for index, line in enumerate(lines):
        hash_ids = json.loads(line)["hash_ids"]
        key = hash_ids[1] if len(hash_ids) > 1 else ("alone", index)
        keys.setdefault(key, len(keys))
        if keys[key] % stride == offset:
            chosen.append(line)
    return chosen


def run_one(label: str, workload: Path, args, log) -> dict:
    csps = str(Path(sys.executable).with_name("csps"))
    port = find_free_port()
    serve = [csps, "serve", args.model, "--port", str(port), "--max-model-len",
             str(args.max_model_len), *SERVERS[label]]
    bench = [csps, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
             "--dataset-name", "trace", "--dataset-path", str(workload),
             "--length-scale", str(args.length_scale), "--time-scale", str(args.time_scale),
             "--max-input-len", str(args.max_model_len - 512), "--ignore-eos", "--seed", "0",
             "--label", label, "--save-result", "--result-dir", str(args.out_dir),
             "--result-filename", f"{label}.json"]
    for cmd in (serve, bench):
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    with open(args.out_dir / f"{label}.server.log", "w") as server_log:
        proc = subprocess.Popen(serve, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc)
            subprocess.run(bench, check=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return json.loads((args.out_dir / f"{label}.json").read_text())


def summary(results: dict[str, dict], reuse: float) -> dict:
    rows = {label: {"mean_ttft_s": r["mean_ttft_ms"] / 1e3,
                    "median_ttft_s": r["median_ttft_ms"] / 1e3,
                    "p99_ttft_s": r["p99_ttft_ms"] / 1e3,
                    "mean_itl_s": r["mean_itl_ms"] / 1e3,
                    "mean_e2el_s": r["mean_e2el_ms"] / 1e3,
                    "completed": r["completed"],
                    "prefix_cache_hit_rate": r.get("prefix_cache_hit_rate"),
                    "mean_cached_tokens": r.get("mean_cached_tokens")}
            for label, r in results.items()}
    cached, plain = rows["sps2-cache"], rows["sps2-no-cache"]
    return {"trace_reuse": reuse, "rows": rows,
            "mean_ttft_speedup": plain["mean_ttft_s"] / cached["mean_ttft_s"],
            "median_ttft_speedup": plain["median_ttft_s"] / cached["median_ttft_s"],
            "mean_e2el_speedup": plain["mean_e2el_s"] / cached["mean_e2el_s"]}


def markdown(data: dict) -> str:
    lines = [f"workload reuse (from hash_ids): {data['trace_reuse']:.1%}; mean TTFT "
             f"{data['mean_ttft_speedup']:.2f}x, median {data['median_ttft_speedup']:.2f}x, "
             f"mean E2E {data['mean_e2el_speedup']:.2f}x better with the cache", "",
             "| server | mean TTFT s | P50 TTFT s | P99 TTFT s | mean ITL s | mean E2E s | "
             "hit rate | done |", "|---|---|---|---|---|---|---|---|"]
    for label, row in data["rows"].items():
        rate = row["prefix_cache_hit_rate"]
        lines.append(f"| {label} | {row['mean_ttft_s']:.2f} | {row['median_ttft_s']:.2f} | "
                     f"{row['p99_ttft_s']:.2f} | {row['mean_itl_s']:.3f} | "
                     f"{row['mean_e2el_s']:.2f} | "
                     f"{'-' if rate is None else f'{rate:.1%}'} | {row['completed']} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, result) in enumerate(results.items()):
        ttfts = sorted(t for t, e in zip(result["ttfts"], result["errors"], strict=True)
                       if not e)
        ax.plot(ttfts, [(k + 1) / len(ttfts) for k in range(len(ttfts))], label=label,
                color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--conversation-stride", type=int, default=100)
    parser.add_argument("--conversation-offset", type=int, default=40,
                        help="which of the stride samples (default: 40, the sample of 116 "
                             "requests whose reuse, 37.0%%, is nearest the whole trace's 37.4%%)")
    parser.add_argument("--length-scale", type=float, default=1 / 32)
    parser.add_argument("--time-scale", type=float, default=0.07)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--out-dir", type=Path,
                        default=Path("benchmarks/results/prefix_cache_server"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    subset = conversation_subset(Path(args.trace).read_text().splitlines(),
                                 args.conversation_stride, args.conversation_offset)
    with tempfile.TemporaryDirectory() as tmp, open(args.out_dir / "commands.txt", "a") as log:
        workload = Path(tmp) / "conversations.jsonl"
        workload.write_text("\n".join(subset) + "\n")
        block = max(1, round(MOONCAKE_BLOCK_TOKENS * args.length_scale))
        reuse = trace_reuse(scale_records(read_trace(workload), length_scale=args.length_scale),
                            block)
        print(f"{len(subset)} requests, reuse {reuse:.1%} (blocks of {block} tokens)")
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M')} {' '.join(sys.argv)}\n")
        results = {label: run_one(label, workload, args, log) for label in SERVERS}
    data = summary(results, reuse)
    table = markdown(data)
    print(table)
    (args.out_dir / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out_dir / "summary.md").write_text(table + "\n")
    plot(results, args.out_dir / "ttft_cdf.png")


if __name__ == "__main__":
    main()
