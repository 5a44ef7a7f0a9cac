"""Sequence-parallel prefill on CPU (issue 3, item 8): one prompt of N tokens, P=1 vs P=2.

    .venv/bin/python benchmarks/sp_prefill.py --out benchmarks/results/sp_prefill.json \
        --plot benchmarks/results/sp_prefill.png

Configurations (gloo, one torch thread per rank for P=2):
  p1_2t / p1_1t   one process, reference attention, 2 / 1 torch threads (no communication)
  ulysses, allgather_kv, ring   SP-NTP: 2 ranks, each runs the whole model on its chunk
                  (split_prompt, block 16) with SequenceParallelAttention(algorithm)
  sp_tp           SP-TP with T=2: heads and MLP sharded, sequence gathered / reduce-scattered
Per configuration and N: wall time of the forward plus the last token's logits (median of
--repeats after a warm-up at --warmup-tokens), per rank the time inside collectives (CommStats,
waits included) and compute = wall - comm, bytes sent per rank per layer, and the max abs
difference of the last-token logits from p1_2t (a run that also validates).
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
from spawn_ranks import run_ranks

from csps.attention.metadata import AttentionMetadata
from csps.kvcache.placement import split_prompt
from csps.model.loader import load_model
from csps.model.resolve import resolve_model
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import init_parallel_groups
from csps.parallel.sp_attention import SequenceParallelAttention
from csps.parallel.sp_tp import TensorParallelContext

SP_ALGORITHMS = ("ulysses", "allgather_kv", "ring")
BLOCK_SIZE = 16
PHASES = ("prefill_attn", "tp")


def _prompt(num_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(num_tokens)
    return torch.randint(100, 40000, (num_tokens,), generator=gen)  # [N] int64


def _measure(run, stats, barrier, repeats: int, num_layers: int) -> dict:
    """run() -> last-token logits or None; repeats timed runs, each after a barrier."""
    walls, comms, logits = [], [], None
    for _ in range(repeats):
        stats.reset()
        barrier()
        start = time.perf_counter()
        logits = run()
        walls.append(time.perf_counter() - start)
        comms.append(sum(stats.time_s[p] for p in PHASES))
    wall, comm = statistics.median(walls), statistics.median(comms)
    return {"wall_s": wall, "wall_samples_s": walls, "comm_s": comm, "compute_s": wall - comm,
            "bytes_per_layer": {p: stats.bytes_sent[p] / num_layers for p in PHASES
                                if stats.bytes_sent[p]},
            "calls": {p: stats.num_calls[p] for p in PHASES if stats.num_calls[p]},
            "logits": logits}


def _load(folder: str, args, **kwargs):
    """load_model(folder, **kwargs), cut to the first args.num_layers decoder layers if set."""
    model = load_model(folder, **kwargs)
    if args.num_layers:
        model.model.layers = model.model.layers[:args.num_layers]
    return model


def _forward_fn(model, tokens, positions, metadata, last_rank: bool):
    def run():
        with torch.inference_mode():
            hidden = model(tokens, positions, None, metadata)
            return model.compute_logits(hidden[-1:])[0].clone() if last_rank else None
    return run


def _sweep(model, make_run, stats, barrier, args) -> dict:
    """{N: measurement} after one warm-up forward at args.warmup_tokens."""
    num_layers = len(model.model.layers)
    _measure(make_run(args.warmup_tokens), stats, barrier, 1, num_layers)
    out = {}
    for n in args.lengths:
        out[n] = _measure(make_run(n), stats, barrier, args.repeats, num_layers)
        print(f"  {args.label} N={n}: {out[n]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return out


def single_process(folder: str, threads: int, args) -> dict:
    """P=1: the plain model (reference attention) in this process with `threads` threads."""
    torch.set_num_threads(threads)
    args.label = f"p1_{threads}t"
    model = _load(folder, args)

    def make_run(n):
        md = AttentionMetadata.build_no_cache([n], "cpu")
        return _forward_fn(model, _prompt(n), torch.arange(n), md, True)
    return _sweep(model, make_run, CommStats(), lambda: None, args)


def _sp_runs(groups, folder: str, args) -> dict:
    """SP-NTP with each algorithm on this rank: {algorithm: {N: measurement}}."""
    rank, size = groups.sp_rank, groups.sp_size
    stats = CommStats()
    comm = Communicator(groups.sp_group, stats, "prefill_attn")
    out = {}
    for algorithm in args.algorithms:
        model = _load(folder, args, attn_backend=SequenceParallelAttention(comm, algorithm))
        args.label = f"{algorithm} rank {rank}"

        def make_run(n, model=model):
            chunks = split_prompt(n, size, BLOCK_SIZE)
            start = sum(chunks[:rank])
            rows = slice(start, start + chunks[rank])
            md = AttentionMetadata.build_sp_prefill(chunks, rank, "cpu")
            return _forward_fn(model, _prompt(n)[rows], torch.arange(rows.start, rows.stop), md,
                               rank == size - 1)
        out[algorithm] = _sweep(model, make_run, stats,
                                lambda: dist.barrier(group=groups.cpu_group), args)
    return out


def _tp_runs(groups, folder: str, args) -> dict:
    """SP-TP with T=2 on this rank: {N: measurement}."""
    stats = CommStats()
    tp = TensorParallelContext(groups.tp_rank, groups.tp_size,
                               Communicator(groups.tp_group, stats, "tp"))
    model = _load(folder, args, tp=tp)
    args.label = f"sp_tp rank {groups.tp_rank}"

    def make_run(n):
        md = AttentionMetadata.build_no_cache([n], "cpu")
        return _forward_fn(model, _prompt(n), torch.arange(n), md, groups.tp_rank == 0)
    return _sweep(model, make_run, stats, lambda: dist.barrier(group=groups.cpu_group), args)


def _rank_runs(rank: int, world: int, folder: str, args) -> dict:
    """One rank: the SP paths, then SP-TP (run by run_ranks)."""
    out = _sp_runs(init_parallel_groups(sp_size=world, tp_size=1, backend="gloo"), folder, args)
    if args.sp_tp:
        out["sp_tp"] = _tp_runs(init_parallel_groups(sp_size=1, tp_size=world, backend="gloo"),
                                folder, args)
    return out


def two_ranks(folder: str, args, timeout_s: float = 7200.0) -> list[dict]:
    """_rank_runs in 2 spawned gloo ranks; their results in rank order."""
    return run_ranks(_rank_runs, 2, folder, args, timeout_s=timeout_s)


def _row(config: str, num_tokens: int, per_rank: list[dict], ref: dict | None) -> dict:
    """One table row: times of the rank with the most compute (the critical path), bytes of
    the rank that sends the most."""
    busiest = max(per_rank, key=lambda m: m["compute_s"])
    logits = next(m["logits"] for m in per_rank if m["logits"] is not None)
    row = {"config": config, "num_tokens": num_tokens, "ranks": len(per_rank),
           "wall_s": max(m["wall_s"] for m in per_rank),
           "compute_s": busiest["compute_s"], "comm_s": busiest["comm_s"],
           "bytes_per_worker_per_layer": max((m["bytes_per_layer"] for m in per_rank),
                                             key=lambda b: sum(b.values())),  # top sender
           "per_rank": [{k: v for k, v in m.items() if k != "logits"} for m in per_rank]}
    if ref is not None:
        row["max_abs_logit_diff_vs_p1"] = (logits - ref["logits"]).abs().max().item()
    return row


def collect_rows(folder: str, args) -> list[dict]:
    print("p1_2t ...", file=sys.stderr, flush=True)
    p1 = single_process(folder, 2, args)
    rows = [_row("p1_2t", n, [p1[n]], p1[n]) for n in args.lengths]
    if args.p1_one_thread:
        print("p1_1t ...", file=sys.stderr, flush=True)
        p1_1t = single_process(folder, 1, args)
        rows += [_row("p1_1t", n, [p1_1t[n]], p1[n]) for n in args.lengths]
    torch.set_num_threads(2)
    print("P=2 ...", file=sys.stderr, flush=True)
    ranks = two_ranks(folder, args)
    for config in ranks[0]:
        rows += [_row(config, n, [r[config][n] for r in ranks], p1[n]) for n in args.lengths]
    walls = {(r["config"], r["num_tokens"]): r["wall_s"] for r in rows}
    for row in rows:
        for ref in ("p1_2t", "p1_1t"):
            if (ref, row["num_tokens"]) in walls:
                row[f"speedup_vs_{ref}"] = walls[ref, row["num_tokens"]] / row["wall_s"]
    return rows


def _plot_config(axes, i: int, num_configs: int, cells: list[dict], refs: list[float]) -> None:
    """Bars of configuration i (colour C{i}) at every N: time left, bytes right."""
    ax_t, ax_b = axes
    width = 0.8 / num_configs
    xs = [j + (i - 0.5 * (num_configs - 1)) * width for j in range(len(cells))]
    compute = [c["compute_s"] / r for c, r in zip(cells, refs, strict=True)]
    comm = [c["comm_s"] / r for c, r in zip(cells, refs, strict=True)]
    ax_t.bar(xs, compute, width, color=f"C{i}", label=cells[0]["config"])
    ax_t.bar(xs, comm, width, bottom=compute, color=f"C{i}", hatch="//", alpha=0.45)
    for x, c, m, cell in zip(xs, compute, comm, cells, strict=True):
        ax_t.text(x, c + m, f"{cell['wall_s']:.1f}s", ha="center", va="bottom", fontsize=6)
    mb = [sum(c["bytes_per_worker_per_layer"].values()) / 1e6 for c in cells]
    ax_b.bar(xs, mb, width, color=f"C{i}", label=cells[0]["config"])


def plot(rows: list[dict], path: Path) -> None:
    """Left: compute + comm of the busiest rank, as a fraction of p1_2t's wall time (seconds
    printed on each bar). Right: bytes sent per worker per layer (MB)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    lengths = list(dict.fromkeys(r["num_tokens"] for r in rows))
    by_key = {(r["config"], r["num_tokens"]): r for r in rows}
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(15, 5.5))
    for i, config in enumerate(configs):
        _plot_config((ax_t, ax_b), i, len(configs), [by_key[config, n] for n in lengths],
                     [by_key["p1_2t", n]["wall_s"] for n in lengths])
    for ax in (ax_t, ax_b):
        ax.set_xticks(range(len(lengths)), [f"N={n}" for n in lengths])
    ax_t.set_ylabel("time / p1_2t wall time (solid: compute, hatched: comm)")
    ax_t.set_title("Prefill time, busiest rank (labels: wall s)")
    ax_t.legend(fontsize=7)
    ax_b.set_ylabel("MB sent per worker per layer (fp32)")
    ax_b.set_title("Communication volume")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: list[dict]) -> None:
    print("| config | N | wall s | compute s | comm s | MB/worker/layer | speed-up vs P=1 "
          "2t / 1t | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = sum(r["bytes_per_worker_per_layer"].values()) / 1e6
        sp1 = r.get("speedup_vs_p1_1t", float("nan"))
        print(f"| {r['config']} | {r['num_tokens']} | {r['wall_s']:.2f} | {r['compute_s']:.2f} "
              f"| {r['comm_s']:.2f} | {mb:.2f} | {r['speedup_vs_p1_2t']:.2f} / {sp1:.2f} "
              f"| {r.get('max_abs_logit_diff_vs_p1', 0.0):.1e} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-tokens", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=0,
                        help="run only the first L decoder layers (default: all)")
    parser.add_argument("--algorithms", nargs="+", default=list(SP_ALGORITHMS),
                        choices=SP_ALGORITHMS)
    parser.add_argument("--no-sp-tp", dest="sp_tp", action="store_false")
    parser.add_argument("--no-p1-one-thread", dest="p1_one_thread", action="store_false")
    parser.add_argument("--quick", action="store_true", help="N in {512, 1024}, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sp_prefill.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/sp_prefill.png"))
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from --out")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.warmup_tokens = [512, 1024], 1, 128
    return args


def main() -> None:
    args = parse_args()
    if args.replot:
        return plot(json.loads(args.out.read_text())["rows"], args.plot)
    folder = str(resolve_model(args.model))
    start = time.perf_counter()
    rows = collect_rows(folder, args)
    print_table(rows)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor(), "torch": torch.__version__,
                          "threads": {"p1_2t": 2, "p1_1t": 1, "per_rank_p2": 1}},
              "model": args.model, "model_folder": folder, "dtype": "float32",
              "num_layers": args.num_layers or "all",
              "repeats": args.repeats, "warmup_tokens": args.warmup_tokens,
              "total_run_s": time.perf_counter() - start, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.plot)


if __name__ == "__main__":
    main()
