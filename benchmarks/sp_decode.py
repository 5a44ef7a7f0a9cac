"""Sequence-parallel decode on CPU (issue 4): q-move vs kv-move, and TBT under mixed load.

    .venv/bin/python benchmarks/sp_decode.py            # both parts, SmolLM2-135M, fp32

Part A (per-step cost vs context): P gloo ranks (one torch thread each) each build a q-move
and a kv-move Worker sharing one KV cache filled with random values. Per context N, a request
is placed as if SP-prefilled (allocate_prefill(split_prompt(N, P, 16)) over all ranks, leader
P-1, num_computed_tokens = N, one output token) in a fresh sps2 Scheduler, which then emits
real decode iterations. Per mode, alternating modes at each N: the wall time of
Worker.execute_model (whole forward + exchange; median of --steps after --warmup, every step
after a barrier) and the "decode_attn" bytes each rank sent. Also 8 requests of 8k together.
Part B (TBT under mixed load): the engine (LLM, 2 SP worker processes) serves 6 short
requests while 3 long prompts arrive at fixed times; sps2 separated decode vs hybrid batching:
per config TBT p50/p99/max of the short requests, TTFTs, total time, every step's duration.
Machine noise: compare q-move with kv-move (measured alternately) and (a) with (b) as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from spawn_ranks import run_ranks

from csps.config import SchedulerConfig
from csps.engine.worker import Worker
from csps.kvcache.placement import DistributedKVCacheManager, split_prompt
from csps.model.loader import read_arch_config
from csps.model.resolve import resolve_model
from csps.parallel.groups import init_parallel_groups
from csps.request import Request, RequestStatus, SamplingParams
from csps.scheduler import RunnerOutput, Scheduler

BLOCK = 16
MODES = ("qmove", "kvmove")
GREEDY = SamplingParams(temperature=0, ignore_eos=True)


# ---- Part A: one decode step vs context length ---------------------------------------------
def _place_decoding(scheduler: Scheduler, rid: str, n: int, sp_size: int) -> None:
    """Make rid look SP-prefilled over all ranks with n tokens of context, now decoding."""
    scheduler.kv_cache_manager.allocate_prefill(rid, split_prompt(n, sp_size, BLOCK),
                                                list(range(sp_size)))
    prompt = torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    request = Request(rid, prompt, GREEDY, max_tokens=1 << 20)
    request.num_computed_tokens, request.status = n, RequestStatus.RUNNING
    request.output_token_ids.append(prompt[-1])
    scheduler.requests[rid] = request
    scheduler.running.append(request)
    scheduler._leaders[rid] = sp_size - 1  # as admit_sequence_parallel: the last rank leads


def _step(worker: Worker, scheduler: Scheduler, groups) -> tuple[float, int, float]:
    """One scheduled iteration on every rank -> this rank's (execute wall s, decode bytes,
    seconds inside the decode collectives, waits included)."""
    output = scheduler.schedule()
    assert all(s.num_scheduled_tokens == 1 for s in output.scheduled_requests)
    dist.barrier(group=groups.cpu_group)
    comm_before = worker.comm_stats.time_s["decode_attn"]
    start = time.perf_counter()
    result = worker.execute_model(output)
    wall = time.perf_counter() - start
    gathered = [None] * groups.sp_size
    dist.all_gather_object(gathered, result, group=groups.cpu_group)
    scheduler.update_from_output(output, RunnerOutput.merge(gathered))
    return (wall, result.comm_bytes.get("decode_attn", 0),
            worker.comm_stats.time_s["decode_attn"] - comm_before)


def _case(worker: Worker, groups, n: int, num_requests: int, tag: str, args) -> dict:
    manager = DistributedKVCacheManager(groups.sp_size, args.num_blocks, BLOCK)
    scheduler = Scheduler(SchedulerConfig(policy="sps2"), manager, 1 << 20)
    for i in range(num_requests):
        _place_decoding(scheduler, f"{tag}-{i}", n, groups.sp_size)
    samples = [_step(worker, scheduler, groups) for _ in range(args.warmup + args.steps)]
    walls, sent, comm = zip(*samples[args.warmup:], strict=True)
    return {"wall_s": statistics.median(walls), "wall_samples_s": walls,
            "comm_s": statistics.median(comm), "bytes_per_step": statistics.median(sent)}


def _rank_main(rank: int, world: int, folder: str, args) -> list[dict]:
    """One rank of part A (run by run_ranks): rank 0's rows hold every rank's figures."""
    groups = init_parallel_groups(sp_size=world, tp_size=1, backend="gloo")
    arch = read_arch_config(folder)
    workers = {m: Worker(folder, arch, "float32", "cpu", args.num_blocks if m == "qmove"
                         else 1, BLOCK, 0, groups, sp_decode=m) for m in MODES}
    for kv in workers["qmove"].runner.kv_caches:
        kv.k_cache.normal_()
        kv.v_cache.normal_()
    workers["kvmove"].runner.kv_caches = workers["qmove"].runner.kv_caches  # shared
    cases = [(n, 1) for n in args.lengths] + [(n, r) for r, n in args.batched]
    rows = []
    for n, num_requests in cases:
        for mode in MODES:  # side by side, so load from other processes hits both alike
            row = _case(workers[mode], groups, n, num_requests, f"{mode}{n}x{num_requests}",
                        args)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, row, group=groups.cpu_group)
            rows.append({"P": world, "mode": mode, "context": n, "requests": num_requests,
                         "wall_s": max(r["wall_s"] for r in per_rank),
                         "leader_comm_s": per_rank[-1]["comm_s"],
                         "bytes_per_step": sum(r["bytes_per_step"] for r in per_rank),
                         "per_rank": per_rank})
            if rank == 0:
                print(f"  P={world} {mode} N={n} x{num_requests}: "
                      f"{rows[-1]['wall_s'] * 1e3:.1f} ms, "
                      f"{rows[-1]['bytes_per_step'] / 1e6:.3f} MB", file=sys.stderr,
                      flush=True)
    return rows


def part_a(folder: str, world: int, args) -> list[dict]:
    """Run _rank_main on `world` spawned gloo ranks; rank 0's rows."""
    total = max([*args.lengths, *(r * n for r, n in args.batched)])
    args.num_blocks = -(-total // (world * BLOCK)) + 8 * 4 + 16  # + partial and decode blocks
    return run_ranks(_rank_main, world, folder, args, timeout_s=3600.0)[0]


# ---- Part B: TBT of short requests while long prompts arrive --------------------------------
def _run_clock(engine, arrivals: list[tuple], gen) -> tuple[dict, list, float]:
    """Add (time, id, prompt_len, max_tokens) arrivals on time and step until all finish ->
    ({id: [arrival, token times...]}, per-step records, total seconds)."""
    pending, times, counts, steps = sorted(arrivals), {}, {}, []
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, rid, length, out = pending.pop(0)
            ids = torch.randint(100, 40000, (length,), generator=gen).tolist()
            engine.add_request(rid, None, ids, SamplingParams(max_tokens=out, ignore_eos=True,
                                                              temperature=0))
            times[rid] = [now]
        if not engine.has_unfinished_requests():
            time.sleep(0.001)
            continue
        outputs, stats = engine.step()
        end = time.perf_counter() - start
        steps.append({"start_s": now, "wall_s": end - now,
                      "prompt_tokens": stats.num_prompt_tokens,
                      "sampled": stats.num_generation_tokens})
        for out in outputs:  # token_ids are cumulative
            new = len(out.outputs[0].token_ids) - counts.get(out.request_id, 0)
            counts[out.request_id] = len(out.outputs[0].token_ids)
            times[out.request_id] += [end] * new
    return times, steps, time.perf_counter() - start


def serve_mixed(folder: str, label: str, args, **engine_kwargs) -> dict:
    """6 short requests at t=0, long prompts at args.long_at, on a 2-rank engine."""
    from csps import LLM

    llm = LLM(folder, sequence_parallel_size=2, kv_cache_memory_bytes=1 << 30,
              max_model_len=8192, policy="sps2", **engine_kwargs)
    engine = llm.llm_engine
    for i, length in enumerate((args.short_len, args.long_len)):  # warm both prefill paths
        engine.add_request(f"warm{i}", None, list(range(100, 100 + length)),
                           SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    arrivals = [(0.0, f"s{i}", args.short_len, args.short_out) for i in range(6)]
    arrivals += [(t, f"L{i}", args.long_len, 8) for i, t in enumerate(args.long_at)]
    times, steps, total = _run_clock(engine, arrivals, torch.Generator().manual_seed(1))
    engine.shutdown()
    gaps = sorted((t1, t1 - t0) for rid, ts in times.items() if rid.startswith("s")
                  for t0, t1 in zip(ts[1:], ts[2:], strict=False))  # (time, TBT)
    tbt = sorted(g for _, g in gaps)
    ttft = {rid: ts[1] - ts[0] for rid, ts in times.items()}
    return {"label": label, "engine_kwargs": engine_kwargs, "total_s": total,
            "tbt_p50_s": tbt[len(tbt) // 2], "tbt_p99_s": tbt[min(len(tbt) - 1,
                                                                   int(0.99 * len(tbt)))],
            "tbt_max_s": tbt[-1], "ttft_long_s": {r: t for r, t in ttft.items() if r[0] == "L"},
            "ttft_short_s": {r: t for r, t in ttft.items() if r[0] == "s"},
            "tbt_series": gaps, "token_times": times, "steps": steps}


# ---- output -----------------------------------------------------------------------------------
def plot(result: dict, path_a: Path, path_b: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    for i, row_p in enumerate(sorted({r["P"] for r in result["part_a"]})):
        for mode, style in zip(MODES, ("-o", "--s"), strict=True):
            rows = [r for r in result["part_a"] if r["P"] == row_p and r["mode"] == mode
                    and r["requests"] == 1]
            xs = [r["context"] for r in rows]
            ax_t.plot(xs, [r["wall_s"] * 1e3 for r in rows], style, color=f"C{i}",
                      label=f"{mode} P={row_p}")
            ax_b.plot(xs, [r["bytes_per_step"] / 1e6 for r in rows], style, color=f"C{i}",
                      label=f"{mode} P={row_p}")
    for ax in (ax_t, ax_b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.legend(fontsize=8)
    ax_t.set_ylabel("ms per decode step (median)")
    ax_b.set_ylabel("MB sent per step, all ranks (decode_attn)")
    ax_t.set_title("One request's decode step, SmolLM2-135M fp32, CPU")
    ax_b.set_title("Decode exchange volume")
    fig.tight_layout()
    fig.savefig(path_a, dpi=120)
    if result.get("part_b"):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for i, run in enumerate(result["part_b"]):
            xs, ys = zip(*run["tbt_series"], strict=True)
            ax.plot(xs, [y * 1e3 for y in ys], ".", color=f"C{i}", ms=3, label=run["label"])
        for t in result["args"]["long_at"]:
            ax.axvline(t, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("time since start (s); dotted: long prompt arrivals")
        ax.set_ylabel("gap between tokens of a short request (ms)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path_b, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--parts", default="ab")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--batched", type=lambda s: tuple(map(int, s.split("x"))), nargs="*",
                        default=[(8, 8192)], help="REQUESTSxCONTEXT cases, e.g. 8x8192")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--short-len", type=int, default=64)
    parser.add_argument("--short-out", type=int, default=96)
    parser.add_argument("--long-len", type=int, default=3072)
    parser.add_argument("--long-at", type=float, nargs="+", default=[2.0, 10.0, 18.0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sp_decode.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw from --out")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    plots = args.out.with_suffix(".png"), args.out.with_name(args.out.stem + "_tbt.png")
    if args.replot:
        return plot(json.loads(args.out.read_text()), *plots)
    folder = str(resolve_model(args.model))
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "model": args.model,
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "part_a": [],
              "part_b": []}
    if "a" in args.parts:
        for world in args.ranks:
            print(f"part A, P={world} ...", file=sys.stderr, flush=True)
            result["part_a"] += part_a(folder, world, args)
            args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")  # so far
    if "b" in args.parts:
        torch.set_num_threads(1)  # the engine process only schedules; workers get a core each
        for label, kwargs in (("sps2 separated", {}),
                              ("hybrid batching", {"long_prompt_threshold": 10**9,
                                                   "hybrid_batching": True})):
            print(f"part B, {label} ...", file=sys.stderr, flush=True)
            result["part_b"].append(serve_mixed(folder, label, args, **kwargs))
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, *plots)


if __name__ == "__main__":
    main()
