"""Dense SP vs CSA prefill on CPU (issue 5, item 4): bytes per worker and prefill time.

    .venv/bin/python benchmarks/csa_prefill.py --out benchmarks/results/csa_prefill.json \
        --plot benchmarks/results/csa_prefill.png

One prompt of N tokens (--lengths), SmolLM2 real weights cut to the first --num-layers decoder
layers, split over P gloo ranks (--sp-sizes; one torch thread each) exactly as the engine's SP
prefill splits it (split_prompt, block 16). Per P, the configurations of CONFIGS run in
interleaved rounds (every config once per round, --repeats rounds after a warm-up), so load
from other jobs on the cores hits them alike; the fastest round is reported, the median beside
it. Per run: wall time of the slowest rank (barrier, forward, last-token logits), time inside
collectives of the busiest rank, bytes each rank sends in "prefill_attn" (the top sender), and
the last-token logits' max difference from dense Ulysses (CSA is sparse: it differs). Accuracy
figures come from benchmarks/csa_accuracy.py on the full model; --accuracy merges them into the
table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from sp_prefill import BLOCK_SIZE, _forward_fn, _load, _prompt
from spawn_ranks import run_ranks

from csps.attention.metadata import AttentionMetadata
from csps.contract.csa_config import CsaConfig
from csps.kvcache.placement import split_prompt
from csps.model.resolve import resolve_model
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import init_parallel_groups
from csps.parallel.sp_attention import SequenceParallelAttention

# name -> (algorithm, levels with P for the SP size, far_queries, micro_batch)
CONFIGS = {
    "dense ulysses": ("ulysses", "", "all", ""),
    "dense ring": ("ring", "", "all", ""),
    "csa 1:1,P:2 (default)": ("csa", "1:1,P:2", "all", ""),
    "csa 1:1,P:2 pipelined 3x512": ("csa", "1:1,P:2", "all", "3x512"),
    "csa 1:1,P:4": ("csa", "1:1,P:4", "all", ""),
    "csa 1:1,P:4 sampled": ("csa", "1:1,P:4", "sampled", ""),
    "csa 1:1,2:2,4:4": ("csa", "1:1,2:2,4:4", "all", ""),
}


def _backend(name: str, comm: Communicator) -> SequenceParallelAttention:
    algorithm, levels, far_queries, micro_batch = CONFIGS[name]
    config = None
    if algorithm == "csa":
        config = CsaConfig.parse(levels.replace("P", str(comm.size)), far_queries, micro_batch)
    return SequenceParallelAttention(comm, algorithm, csa_config=config)


def _applies(name: str, sp_size: int) -> bool:
    levels = CONFIGS[name][1]
    return "2:2,4:4" not in levels or sp_size == 4


def _rank_runs(rank: int, world: int, folder: str, args) -> dict:
    """This rank's measurements: {config: {N: {"runs": [...], "logits": tensor | None}}}."""
    groups = init_parallel_groups(sp_size=world, tp_size=1, backend="gloo")
    stats = CommStats()
    comm = Communicator(groups.sp_group, stats, "prefill_attn")
    model = _load(folder, args)
    names = [n for n in args.configs if _applies(n, world)]
    backends = {n: _backend(n, comm) for n in names}
    last = rank == world - 1

    def run(name: str, n: int) -> dict:
        for layer in model.model.layers:
            layer.self_attn.attn_backend = backends[name]
        chunks = split_prompt(n, world, BLOCK_SIZE)
        start = sum(chunks[:rank])
        rows = slice(start, start + chunks[rank])
        md = AttentionMetadata.build_sp_prefill(chunks, rank, "cpu")
        fn = _forward_fn(model, _prompt(n)[rows], torch.arange(rows.start, rows.stop), md, last)
        stats.reset()
        dist.barrier(group=groups.cpu_group)
        t0 = time.perf_counter()
        logits = fn()
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "comm_s": stats.time_s["prefill_attn"],
                "bytes": stats.bytes_sent["prefill_attn"],
                "calls": stats.num_calls["prefill_attn"],
                # numpy, not a tensor: a tensor crosses the result queue as a shared-memory
                # handle that dies with this process
                "logits": None if logits is None else logits.numpy()}

    for name in names:  # warm-up
        run(name, args.warmup_tokens)
    out = {name: {n: {"runs": [], "logits": None} for n in args.lengths} for name in names}
    for n in args.lengths:
        for round_ in range(args.repeats):
            for name in names:
                result = run(name, n)
                out[name][n]["logits"] = result.pop("logits")
                out[name][n]["runs"].append(result)
                if rank == 0:
                    print(f"  P={world} N={n} round {round_} {name}: {result['wall_s']:.1f} s",
                          file=sys.stderr, flush=True)
    return out


def _rows(sp_size: int, per_rank: list[dict], args) -> list[dict]:
    rows = []
    for name, by_len in per_rank[0].items():
        for n in by_len:
            rounds = list(zip(*(r[name][n]["runs"] for r in per_rank), strict=True))
            walls = [max(run["wall_s"] for run in rnd) for rnd in rounds]
            best = rounds[walls.index(min(walls))]
            logits = per_rank[-1][name][n]["logits"]
            dense = per_rank[-1]["dense ulysses"][n]["logits"]
            rows.append({
                "config": name, "sp_size": sp_size, "num_tokens": n,
                "levels": CONFIGS[name][1].replace("P", str(sp_size)),
                "wall_s": min(walls), "wall_median_s": statistics.median(walls),
                "wall_samples_s": walls,
                "comm_s_busiest": max(run["comm_s"] for run in best),
                "mb_per_worker": max(run["bytes"] for run in best) / 1e6,
                "mb_per_worker_per_rank": [run["bytes"] / 1e6 for run in best],
                "max_abs_logit_diff_vs_dense": float(abs(logits - dense).max())})
    for row in rows:
        ref = next(r for r in rows if r["config"] == "dense ulysses"
                   and r["num_tokens"] == row["num_tokens"])
        row["speedup_vs_dense"] = ref["wall_s"] / row["wall_s"]
        row["speedup_vs_dense_median"] = ref["wall_median_s"] / row["wall_median_s"]
        row["bytes_ratio_dense_over_this"] = ref["mb_per_worker"] / max(row["mb_per_worker"],
                                                                         1e-12)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| P | N | config | wall s (best / median) | speed-up vs Ulysses (best / median) "
          "| MB/worker | dense/this bytes | comm s | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sp_size']} | {r['num_tokens']} | {r['config']} | {r['wall_s']:.2f} / "
              f"{r['wall_median_s']:.2f} | {r['speedup_vs_dense']:.2f} / "
              f"{r['speedup_vs_dense_median']:.2f} | {r['mb_per_worker']:.1f} | "
              f"{r['bytes_ratio_dense_over_this']:.1f} | {r['comm_s_busiest']:.2f} | "
              f"{r['max_abs_logit_diff_vs_dense']:.2f} |")


def plot(rows: list[dict], path: Path) -> None:
    """Per (P, N): bars of wall time (left) and MB per worker (right), one per config."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = list(dict.fromkeys((r["sp_size"], r["num_tokens"]) for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(16, 5.5))
    width = 0.8 / len(configs)
    for i, name in enumerate(configs):
        xs, walls, mbs = [], [], []
        for j, cell in enumerate(cells):
            row = next((r for r in rows if (r["sp_size"], r["num_tokens"]) == cell
                        and r["config"] == name), None)
            if row is not None:
                xs.append(j + (i - 0.5 * (len(configs) - 1)) * width)
                walls.append(row["wall_s"])
                mbs.append(row["mb_per_worker"])
        ax_t.bar(xs, walls, width, color=f"C{i}", label=name)
        ax_b.bar(xs, mbs, width, color=f"C{i}", label=name)
    for ax in (ax_t, ax_b):
        ax.set_xticks(range(len(cells)), [f"P={p} N={n}" for p, n in cells])
    ax_t.set_ylabel("prefill wall s (slowest rank, best round)")
    ax_b.set_ylabel("MB sent per worker (prefill attention, all layers)")
    ax_b.set_yscale("log")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--sp-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-tokens", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="N=1024, P=2, 1 round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/csa_prefill.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/csa_prefill.png"))
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from --out")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.sp_sizes, args.repeats, args.warmup_tokens = [1024], [2], 1, 256
    return args


def main() -> None:
    args = parse_args()
    if args.replot:
        return plot(json.loads(args.out.read_text())["rows"], args.plot)
    folder = str(resolve_model(args.model))
    start = time.perf_counter()
    rows = []
    for sp_size in args.sp_sizes:
        print(f"P={sp_size} ...", file=sys.stderr, flush=True)
        rows += _rows(sp_size, run_ranks(_rank_runs, sp_size, folder, args), args)
        print_table(rows)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads_per_rank": 1,
                          "load_average_at_end": os.getloadavg()},
              "model": args.model, "num_layers": args.num_layers, "dtype": "float32",
              "repeats": args.repeats, "total_run_s": time.perf_counter() - start,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.plot)


if __name__ == "__main__":
    main()
