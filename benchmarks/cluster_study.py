"""Simulated cluster study (issue 7, item 4): sarathi vs vllm vs sps2 vs loongserve on A100
clusters, through `csps simulate`'s API (the real schedulers, the GPU roofline's time).

    nice -n 10 .venv/bin/python benchmarks/cluster_study.py \
        --trace ../shared/data/traces/mooncake_conversation.jsonl

Grid: clusters 8xA100-80GB-nvlink and 4x8xA100-80GB-ib; models llama-3-8b-262k (TP 1) and
yi-34b-200k (TP 2); workloads `mooncake` (the trace's first --num-prompts requests at their
native lengths, Poisson arrivals) and `longdoc` (prompts log-uniform in 16k-200k tokens,
outputs uniform in 100-500, Poisson). Rates: --rate-factors x sarathi's saturation rate on
one node (its request throughput with every request sent at once), x4 on four nodes (sarathi's
replicas are independent, so the per-GPU load stays the same). Sarathi-Serve's capacity
(median scheduling delay <= 2 s) is not used: sarathi admits a prompt as soon as its KV fits,
so with long prompts the delay stays near 0 well past saturation (docs/cluster_study.md).
Every result JSON (per-request ITLs dropped, to keep them small), summary.json (the five
figures and their ratios vs sarathi, LoongServe's normalised latencies, per setting),
summary.md and the plots go to --out-dir; commands.txt records the invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from csps.bench.arrivals import arrival_times
from csps.bench.traces import read_trace
from csps.bench.workload import RequestSpec
from csps.config import EngineConfig, ParallelConfig, SchedulerConfig
from csps.costmodel.models import max_position_embeddings
from csps.simulator.run import SimulationConfig, simulate

sys.path.insert(0, str(Path(__file__).parent))
from policy_study import FIGURES, figures  # noqa: E402

CLUSTERS = {"1x8-nvlink": ("8xA100-80GB-nvlink", 1), "4x8-ib": ("4x8xA100-80GB-ib", 4)}
MODELS = {"llama-3-8b-262k": 1, "yi-34b-200k": 2}  # model -> TP per instance (weights fit)
COLORS = {label: f"C{i}" for i, label in enumerate(
    ["sarathi-2048", "vllm", "sps2", "sps2-dense", "loongserve", "sps2-cluster",
     "sps2-cluster-dense", "sps2-lockstep", "sps2-slo", "sps2-c2048",
     "loongserve-lockstep", "sps2-kvc", "sps2-kvc1.5", "sarathi-tp8", "sps2-tp2",
     "sps2-tp4", "sps2-tp4-c256", "sps2-tp4-c384"])}  # one per policy
PAPER_UP_TO = dict(zip(FIGURES, (7.5, 1.92, 9.8, 8.2, 5.2), strict=True))
NORMALIZED = ("mean_normalized_latency_ms", "mean_ttft_per_input_token_ms", "mean_tpot_ms")


def layouts(num_nodes: int, tp: int) -> dict[str, tuple[str, int, int, dict, dict]]:
    """label -> (policy, SP size, replicas, ParallelConfig extras, SchedulerConfig extras)."""
    gpus, per_node = 8 * num_nodes, 8 // tp
    runs = {"sarathi": ("sarathi", 1, gpus // tp, {}, {"max_num_batched_tokens": 512}),
            "sarathi-2048": ("sarathi", 1, gpus // tp, {}, {"max_num_batched_tokens": 2048}),
            "vllm": ("vllm", 1, gpus // tp, {}, {}),
            "sps2": ("sps2", per_node, num_nodes, {"sp_attention": "csa"}, {}),
            "sps2-dense": ("sps2", per_node, num_nodes, {"sp_attention": "ulysses"}, {}),
            "loongserve": ("loongserve", per_node, num_nodes, {"sp_attention": "ring"},
                           {"loongserve_sp_batch": 0}),
            # issue 12: the lock-step engine before per-instance steps, bigger slices, an SLO
            "sps2-lockstep": ("sps2", per_node, num_nodes, {"sp_attention": "csa"},
                              {"lockstep": True}),
            "sps2-c2048": ("sps2", per_node, num_nodes, {"sp_attention": "csa"},
                           {"sp_prefill_chunk": 2048}),
            "sps2-slo": ("sps2", per_node, num_nodes, {"sp_attention": "csa"},
                         {"slo_tbt": 0.1}),
            # KV consolidated onto one rank after each SP prefill, decode-free groups first
            "sps2-kvc": ("sps2", per_node, num_nodes, {"sp_attention": "csa"},
                         {"consolidate_decode_kv": 100.0}),
            # sarathi as one TP-8 replica per node (for reference: not Sarathi-Serve's own layout)
            "sarathi-tp8": ("sarathi", 1, num_nodes, {"tensor_parallel_size": 8},
                            {"max_num_batched_tokens": 512}),
            "sps2-kvc1.5": ("sps2", per_node, num_nodes, {"sp_attention": "csa"},
                            {"consolidate_decode_kv": 1.5}),
            # issue 13: loongserve before per-instance steps (its old row, to the digit)
            "loongserve-lockstep": ("loongserve", per_node, num_nodes, {"sp_attention": "ring"},
                                    {"loongserve_sp_batch": 0, "lockstep": True})}
    # SP x TP (algorithms.md 2.1): TP inside each SP rank, SP over the node's rest; CSA
    for label, sp_tp, chunk in (("sps2-tp2", 2, 512), ("sps2-tp4", 4, 512),
                                ("sps2-tp4-c256", 4, 256), ("sps2-tp4-c384", 4, 384)):
        runs[label] = ("sps2", 8 // sp_tp, num_nodes,
                       {"sp_attention": "csa", "tensor_parallel_size": sp_tp},
                       {"sp_prefill_chunk": chunk})
    if num_nodes > 1:  # one SP group over the whole cluster: its far levels cross InfiniBand
        runs["sps2-cluster"] = ("sps2", gpus // tp, 1, {"sp_attention": "csa"}, {})
        runs["sps2-cluster-dense"] = ("sps2", gpus // tp, 1, {"sp_attention": "ulysses"}, {})
    return runs


def sim_config(cluster: str, model: str, label: str) -> SimulationConfig:
    name, nodes = CLUSTERS[cluster]
    tp = MODELS[model]
    policy, sp, replicas, parallel, scheduler = layouts(nodes, tp)[label]
    engine = EngineConfig(scheduler=SchedulerConfig(policy=policy, **scheduler),
                          parallel=ParallelConfig(**{"sequence_parallel_size": sp,
                                                     "tensor_parallel_size": tp, **parallel}))
    return SimulationConfig(engine, model=model, cluster=name, num_replicas=replicas)


def lengths(workload: str, model: str, num: int, trace: str) -> list[tuple[int, int]]:
    """(input, output) tokens per request, clipped to the model's context."""
    context = max_position_embeddings(model)
    if workload == "mooncake":
        pairs = [(r.input_len, r.output_len) for r in read_trace(trace)[:num]]
    else:
        rng = np.random.default_rng(1)
        inputs = np.exp(rng.uniform(math.log(16_384), math.log(200_000), num)).astype(int)
        pairs = list(zip(inputs.tolist(), rng.integers(100, 501, num).tolist(), strict=True))
    return [(min(i, context - o - 16), o) for i, o in pairs]


def specs_at(pairs: list[tuple[int, int]], rate: float) -> list[RequestSpec]:
    times = arrival_times(len(pairs), rate, 1.0, seed=0)
    return [RequestSpec(t, i, o) for t, (i, o) in zip(times, pairs, strict=True)]


def sarathi_saturation(model: str, pairs: list) -> dict:
    """Sarathi's (budget 512) request throughput on one node with every request sent at once:
    the rate past which its queue can only grow."""
    result = simulate(sim_config("1x8-nvlink", model, "sarathi"), specs_at(pairs, math.inf))
    return {"saturation_rate": result["request_throughput"], "num_prompts": len(pairs),
            "duration_s": result["duration"]}


def summarize_setting(results: dict[str, dict]) -> dict:
    figs = {label: figures(r) for label, r in results.items()}
    base = figs["sarathi"]
    ratios = {label: {n: (f[n] / base[n] if "throughput" in n else base[n] / f[n])
                      for n in FIGURES} for label, f in figs.items()}
    norm = {label: {k: r[k] for k in NORMALIZED} for label, r in results.items()}
    extra = {label: {"completed": r["completed"], "failed": r["failed"],
                     "preemptions": r["simulator"]["num_preemptions"],
                     "wall_s": r["simulator"]["wall_s"]} for label, r in results.items()}
    return {"figures": figs, "ratios_vs_sarathi": ratios, "normalized_ms": norm, "runs": extra}


def run_setting(cluster: str, model: str, workload: str, rate: float, pairs: list,
                out_dir: Path, labels: list[str]) -> dict:
    name = f"{cluster}_{model}_{workload}_{rate:.4g}"
    results = {}
    for label in [x for x in layouts(CLUSTERS[cluster][1], MODELS[model]) if x in labels]:
        config = sim_config(cluster, model, label)
        start = time.perf_counter()
        result = simulate(config, specs_at(pairs, rate))
        result.pop("itls", None)
        result["config"]["workload"] = {"name": workload, "request_rate": rate,
                                        "num_prompts": len(pairs)}
        results[label] = result
        (out_dir / "runs").mkdir(parents=True, exist_ok=True)
        (out_dir / "runs" / f"{name}_{label}.json").write_text(json.dumps(result) + "\n")
        print(f"{name} {label}: TTFT {result['mean_ttft_ms'] / 1e3:.2f} s, mean ITL "
              f"{result['mean_itl_ms']:.1f} ms, E2E {result['mean_e2el_ms'] / 1e3:.2f} s, "
              f"{result['completed']} done ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"cluster": cluster, "model": model, "workload": workload, "request_rate": rate,
            "name": name, **summarize_setting(results)}


def markdown(settings: list[dict]) -> str:
    lines = ["| setting | policy | " + " | ".join(FIGURES) + " | norm. latency ms/token |",
             "|---" * (len(FIGURES) + 3) + "|"]
    for s in settings:
        for label, ratio in s["ratios_vs_sarathi"].items():
            cells = " | ".join(f"{ratio[n]:.2f}x" for n in FIGURES)
            norm = s["normalized_ms"][label]["mean_normalized_latency_ms"]
            lines.append(f"| {s['name']} | {label} | {cells} | {norm:.2f} |")
    return "\n".join(lines) + "\n"


def _grid(num: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, num)
    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[num:]:
        ax.axis("off")
    return plt, fig, list(axes.flat)


def plot_ratios(settings: list[dict], path: Path) -> None:
    """Per setting: each policy's five ratios vs sarathi (log scale), the paper's "up to"
    values as black markers."""
    plt, fig, axes = _grid(len(settings))
    short = ("TTFT", "TBT", "E2E", "prefill tput", "decode tput")
    for ax, s in zip(axes, settings, strict=False):
        ratios = {k: v for k, v in s["ratios_vs_sarathi"].items() if k != "sarathi"}
        width = 0.8 / len(ratios)
        for i, (label, by_name) in enumerate(ratios.items()):
            xs = [j + (i - 0.5 * (len(ratios) - 1)) * width for j in range(len(FIGURES))]
            ax.bar(xs, [max(by_name[n], 1e-3) for n in FIGURES], width, label=label,
                   color=COLORS[label])
        ax.scatter(range(len(FIGURES)), [PAPER_UP_TO[n] for n in FIGURES], marker="_",
                   s=300, color="black", label="paper, up to", zorder=3)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_xticks(range(len(FIGURES)), short, fontsize=7)
        ax.set_title(s["name"].replace("_", " "), fontsize=7)
    axes[0].set_ylabel("ratio vs sarathi (>1 better)")
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
               fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_normalized(settings: list[dict], path: Path) -> None:
    """Per setting: LoongServe's mean per-token latency (latency / (in + out)) per policy."""
    plt, fig, axes = _grid(len(settings))
    for ax, s in zip(axes, settings, strict=False):
        labels = list(s["normalized_ms"])
        ax.bar(range(len(labels)), [s["normalized_ms"][k]["mean_normalized_latency_ms"]
                                    for k in labels], color=[COLORS.get(k, "grey") for k in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=6)
        ax.set_yscale("log")
        ax.set_title(s["name"].replace("_", " "), fontsize=7)
    axes[0].set_ylabel("mean latency / (in + out) [ms]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", required=True)
    parser.add_argument("--clusters", nargs="+", default=list(CLUSTERS), choices=list(CLUSTERS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--workloads", nargs="+", default=["mooncake", "longdoc"])
    parser.add_argument("--policies", nargs="+", default=list(layouts(1, 1)))
    parser.add_argument("--policies-multinode", nargs="+", default=[
        "sarathi", "sps2", "sps2-dense", "sps2-cluster", "sps2-cluster-dense", "loongserve"])
    parser.add_argument("--num-prompts", type=int, default=250, help="per node (mooncake)")
    parser.add_argument("--num-longdoc", type=int, default=100, help="per node (longdoc)")
    parser.add_argument("--rate-factors", type=float, nargs="+", default=[0.5, 0.9],
                        help="request rates as fractions of sarathi's saturation rate")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/cluster_study"))
    parser.add_argument("--plots-only", action="store_true",
                        help="redraw the plots from --out-dir/summary.json")
    args = parser.parse_args()
    if args.plots_only:
        settings = json.loads((args.out_dir / "summary.json").read_text())["settings"]
        plot_ratios(settings, args.out_dir / "ratios.png")
        plot_normalized(settings, args.out_dir / "normalized.png")
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "commands.txt", "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M')}\n{' '.join(sys.argv)}\n")
    settings, saturation = [], {}
    for cluster in args.clusters:
        nodes = CLUSTERS[cluster][1]
        for model in args.models:
            for workload in args.workloads:
                per_node = args.num_prompts if workload == "mooncake" else args.num_longdoc
                key = f"{model}_{workload}"
                if key not in saturation:
                    saturation[key] = sarathi_saturation(
                        model, lengths(workload, model, per_node, args.trace))
                    print(f"{key}: sarathi saturates at "
                          f"{saturation[key]['saturation_rate']:.3g} req/s per node")
                pairs = lengths(workload, model, per_node * nodes, args.trace)
                for factor in args.rate_factors:
                    rate = saturation[key]["saturation_rate"] * factor * nodes
                    labels = args.policies if nodes == 1 else args.policies_multinode
                    settings.append({**run_setting(cluster, model, workload, rate, pairs,
                                                   args.out_dir, labels),
                                     "load_factor": factor})
                    (args.out_dir / "summary.json").write_text(json.dumps(
                        {"sarathi_saturation_per_node": saturation, "paper_up_to": PAPER_UP_TO,
                         "args": {k: str(v) for k, v in vars(args).items()},
                         "settings": settings}, indent=1) + "\n")
    (args.out_dir / "summary.md").write_text(markdown(settings))
    print(markdown(settings))
    plot_ratios(settings, args.out_dir / "ratios.png")
    plot_normalized(settings, args.out_dir / "normalized.png")


if __name__ == "__main__":
    main()
