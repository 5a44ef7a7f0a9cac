"""Serving-policy study on this machine (issue 6, item 4): the real server with 2 workers on a
scaled Mooncake conversation workload, sarathi vs sps2 (dense and CSA) vs loongserve.

    .venv/bin/python benchmarks/policy_study.py \
        --trace ../shared/data/traces/mooncake_conversation.jsonl \
        --out-dir benchmarks/results/policy_study

For each configuration of SERVERS (in turn, one server at a time on a free port): start
`csps serve` with its flags, wait for /health, replay the same workload with `csps bench serve`
(the first --num-prompts requests of the trace, lengths x --length-scale, inter-arrival times x
--time-scale, prompts clipped to --max-input-len, ignore_eos so every request generates its
trace's (scaled) output length), save the result JSON, stop the server. Then `csps bench compare`
and the paper's five figures as ratios against sarathi (>1 = better):
  average TTFT, TBT (mean ITL), response time (mean E2E latency), prefill throughput (prompt
  tokens / the span from the first arrival to the last first token) and decode throughput
  (generated tokens / the span from the first first token to the last completion).
Every command run is written to commands.txt beside the results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

from csps.parallel.groups import find_free_port

# sps2's configurator and loongserve price iterations with the profile fitted on this machine
PROFILE = "csps/costmodel/profiles/cpu-smollm2-135m-sp2.json"
# label -> `csps serve` flags (besides the model, host and port)
_SPS2 = ["-sp", "2", "--scheduler", "sps2", "--cost-model", PROFILE]
SERVERS = {
    "sarathi": ["-tp", "2", "--scheduler", "sarathi"],
    "sps2-dense": [*_SPS2, "--sp-attention", "ulysses"],
    "sps2-csa": [*_SPS2, "--sp-attention", "csa"],
    "loongserve": ["-sp", "2", "--scheduler", "loongserve", "--sp-attention", "ring"],
    # issue 12: the lock-step engine before per-instance steps, and slice sizes / an SLO
    "sps2-dense-lockstep": [*_SPS2, "--sp-attention", "ulysses", "--lockstep"],
    "sps2-csa-lockstep": [*_SPS2, "--sp-attention", "csa", "--lockstep"],
    "sps2-csa-c256": [*_SPS2, "--sp-attention", "csa", "--sp-prefill-chunk", "256"],
    "sps2-csa-c1024": [*_SPS2, "--sp-attention", "csa", "--sp-prefill-chunk", "1024"],
    "sps2-csa-c2048": [*_SPS2, "--sp-attention", "csa", "--sp-prefill-chunk", "2048"],
    "sps2-csa-slo1": [*_SPS2, "--sp-attention", "csa", "--slo-tbt", "1.0"],
    # KV moved onto one instance after each SP prefill, decode-free groups first
    "sps2-csa-kvc": [*_SPS2, "--sp-attention", "csa", "--consolidate-decode-kv", "100"],
    # issue 13: loongserve on per-instance steps (the default) against its lock-step form,
    # and on 4 workers (real sub-groups of 2 and 3 instances)
    "loongserve-lockstep": ["-sp", "2", "--scheduler", "loongserve", "--sp-attention", "ring",
                            "--lockstep"],
    "loongserve-sp4": ["-sp", "4", "--scheduler", "loongserve", "--sp-attention", "ring",
                       "--cost-model", "csps/costmodel/profiles/cpu-smollm2-135m-sp4.json"],
}
FIGURES = ("avg TTFT", "TBT (mean ITL)", "response time", "prefill throughput",
           "decode throughput")


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def run_one(label: str, args, log) -> Path:
    csps = str(Path(sys.executable).with_name("csps"))
    port = find_free_port()
    serve = [csps, "serve", args.model, "--port", str(port), *SERVERS[label], *args.serve_flags]
    if args.step_traces:
        serve += ["--step-trace", str(args.out_dir / f"{label}.steps.jsonl")]
    bench = [csps, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
             "--dataset-name", "trace", "--dataset-path", args.trace,
             "--num-prompts", str(args.num_prompts), "--length-scale", str(args.length_scale),
             "--time-scale", str(args.time_scale), "--max-input-len", str(args.max_input_len),
             "--ignore-eos", "--seed", "0", "--label", label, "--save-result",
             "--result-dir", str(args.out_dir), "--result-filename", f"{label}.json"]
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
    return args.out_dir / f"{label}.json"


def figures(result: dict) -> dict[str, float]:
    """The paper's five figures from one bench result (seconds; tokens per second)."""
    ok = [i for i, e in enumerate(result["errors"]) if not e]
    starts = [result["start_times"][i] for i in ok]
    first = [result["start_times"][i] + result["ttfts"][i] for i in ok]
    ends = [result["start_times"][i] + result["latencies"][i] for i in ok]
    return {"avg TTFT": result["mean_ttft_ms"] / 1e3,
            "TBT (mean ITL)": result["mean_itl_ms"] / 1e3,
            "response time": result["mean_e2el_ms"] / 1e3,
            "prefill throughput": result["total_input_tokens"] / (max(first) - min(starts)),
            "decode throughput": result["total_output_tokens"] / (max(ends) - min(first))}


def ratio_table(results: dict[str, dict], baseline: str = "sarathi") -> tuple[str, dict]:
    figs = {label: figures(r) for label, r in results.items()}
    base = figs[baseline]
    ratios = {label: {name: (base[name] / f[name] if "throughput" not in name
                             else f[name] / base[name]) for name, _ in f.items()}
              for label, f in figs.items()}
    lines = ["| config | " + " | ".join(FIGURES) + " |", "|---" * (len(FIGURES) + 1) + "|"]
    for label in figs:
        cells = [f"{figs[label][n]:.2f} ({ratios[label][n]:.2f}x)" for n in FIGURES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), {"figures": figs, "ratios_vs_" + baseline: ratios}


def plot(ratios: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ratios)
    for i, (label, by_name) in enumerate(ratios.items()):
        xs = [j + (i - 0.5 * (len(ratios) - 1)) * width for j in range(len(FIGURES))]
        ax.bar(xs, [by_name[n] for n in FIGURES], width, label=label, color=f"C{i}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(FIGURES)), FIGURES)
    ax.set_ylabel("ratio vs sarathi (>1 = better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--length-scale", type=float, default=0.125)
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--max-input-len", type=int, default=7000)
    parser.add_argument("--configs", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    parser.add_argument("--step-traces", action="store_true",
                        help="each server writes its --step-trace to OUT_DIR/LABEL.steps.jsonl")
    parser.add_argument("--serve-flags", nargs=argparse.REMAINDER, default=[],
                        help="extra `csps serve` flags for every config (last on the line)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/policy_study"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "commands.txt", "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M')} {' '.join(sys.argv)}\n")
        paths = {label: run_one(label, args, log) for label in args.configs}
    results = {label: json.loads(p.read_text()) for label, p in paths.items()}
    if "sarathi" in results:  # the ratios need the baseline in the same run
        table, data = ratio_table(results)
        print(table)
        (args.out_dir / "figures.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out_dir / "figures.md").write_text(table + "\n")
        plot(data["ratios_vs_sarathi"], args.out_dir / "figures.png")
    subprocess.run([str(Path(sys.executable).with_name("csps")), "bench", "compare",
                    *map(str, paths.values()), "--out-plot", str(args.out_dir / "compare.png"),
                    "--out-md", str(args.out_dir / "compare.md")], check=False)


if __name__ == "__main__":
    main()
