"""CSA micro-batch pipelining on CPU (issue 5, item 2): how much communication it hides.

    .venv/bin/python benchmarks/csa_pipeline.py --out benchmarks/results/csa_pipeline.json

P=2 gloo ranks, one torch thread each, random fp32 q/k/v (no model): N tokens split evenly,
Hq/Hkv heads, head dim D. Only CSA's far levels are timed (level 0, the local causal block, is
the same for every variant). Per far_queries mode, levels and micro-batch "HEADSxTOKENS":
  unpipelined  csa.py's one all-to-all (two for "sampled") per level, no micro-batches
  sequential   the micro-batches' phases one after another: send all, compute all, return all
               (csa_pipeline.far_levels(overlap=False)), with each phase's time
  pipelined    send(m+1) || compute(m) || return(m-1) (far_levels(overlap=True)), with the
               time blocked in collectives (CommStats: launch plus wait)
Times: the slower rank's wall time after a barrier, every variant run once to warm up, then
--repeats rounds over all variants in turn (interleaved, so load from other jobs on the cores
hits every variant alike); the fastest round is reported, the median in brackets. Phases of
"sequential": send and return from the last rank to arrive (min over ranks: the transfer
alone), compute and merge from the busiest rank; phase_sum_s their sum.
probe: the mechanism alone, per rank: an all-to-all of its q (half to the peer), an attention
of its q to its k/v, and the two overlapped (async all-to-all started first), slower rank's.
hidden = (sequential - pipelined) / (send + return): the share of the communication that the
overlap took off the critical path (< 0 when the pipeline's extra calls and gloo threads cost
more than they hide; > 1 when it also overlaps the ranks' compute, e.g. two-sided merges).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from csps.attention.partial import partial_attention
from csps.contract.csa_config import CsaConfig
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.csa import _keys_travel, _queries_travel
from csps.parallel.csa_pipeline import far_geometry, far_levels, schedule
from csps.parallel.groups import destroy_parallel_groups, find_free_port, init_parallel_groups

WORLD = 2
COMM_PHASES = ("send_s", "return_s")
PHASES = ("send_s", "compute_s", "return_s", "merge_s")


def _inputs(args, rank: int):
    gen = torch.Generator().manual_seed(0)
    n = args.tokens // WORLD
    q = torch.randn(args.tokens, args.heads, args.dim, generator=gen)[rank * n:(rank + 1) * n]
    kv = torch.randn(2, args.tokens, args.kv_heads, args.dim, generator=gen)
    return q, kv[0, rank * n:(rank + 1) * n], kv[1, rank * n:(rank + 1) * n], [n] * WORLD


def _run(fn, comm: Communicator) -> dict:
    """One timed run after a barrier: wall, time blocked in collectives, phase timings."""
    comm.stats.reset()
    timings: dict = {}
    dist.barrier(group=comm.group)
    start = time.perf_counter()
    fn(timings)
    return {"wall_s": time.perf_counter() - start,
            "comm_s": comm.stats.time_s["prefill_attn"],
            "bytes": comm.stats.bytes_sent["prefill_attn"],
            "calls": comm.stats.num_calls["prefill_attn"], **timings}


def _variants(q, k, v, lens, comm: Communicator, args) -> list[tuple[dict, str, object]]:
    """(row, name, fn) per variant; rows shared by a micro-batch's sequential and pipelined."""
    out = []
    for levels in args.levels:
        for mode in args.modes:
            geometry = far_geometry(CsaConfig.parse(levels, far_queries=mode), lens)
            travel = _keys_travel if mode == "all" else _queries_travel
            row = {"levels": levels, "far_queries": mode, "micro_batch": ""}
            out.append((row, "unpipelined", lambda t, g=geometry, f=travel: [
                f(q, k, v, lv, comm, None) for lv in g]))
            for micro in args.micro:
                config = CsaConfig.parse(levels, far_queries=mode, micro_batch=micro)
                row = {"levels": levels, "far_queries": mode, "micro_batch": micro,
                       "num_micro_batches": len(schedule(geometry, k.shape[1], config))}
                for name, overlap in (("sequential", False), ("pipelined", True)):
                    out.append((row, name, lambda t, c=config, o=overlap, g=geometry: far_levels(
                        q, k, v, g, comm, None, c, overlap=o, timings=t)))
    return out


def _probe(q, k, v, comm: Communicator, repeats: int) -> dict:
    """The mechanism alone: one all-to-all of this rank's q (both ways), one attention of q
    to k/v, and both with the all-to-all started before the attention and waited after."""
    def transfer():
        return comm.start_all_to_all([q, q], [q.shape, q.shape])

    def compute():
        partial_attention(q, k, v)

    def both():
        pending = transfer()
        compute()
        pending.wait()

    out = {"bytes": q.numel() * q.element_size()}  # to the peer
    for name, fn in (("comm_s", lambda: transfer().wait()), ("compute_s", compute),
                     ("overlapped_s", both)):
        walls = []
        for _ in range(repeats + 1):
            dist.barrier(group=comm.group)
            start = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - start)
        out[name] = min(walls[1:])
    return out


def _worker(rank: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        groups = init_parallel_groups(sp_size=WORLD, tp_size=1, backend="gloo")
        comm = Communicator(groups.sp_group, CommStats(), "prefill_attn")
        q, k, v, lens = _inputs(args, rank)
        probe = _probe(q, k, v, comm, args.repeats)
        variants = _variants(q, k, v, lens, comm, args)
        for _, _, fn in variants:  # warm-up
            _run(fn, comm)
        runs = [[] for _ in variants]
        for _ in range(args.repeats):  # NOTE: interleaved, so load from other jobs is shared
            for i, (_, _, fn) in enumerate(variants):
                runs[i].append(_run(fn, comm))
        rows = []
        for (row, name, _), samples in zip(variants, runs, strict=True):
            if not rows or rows[-1] is not row:
                rows.append(row)
            row[name] = samples
        results.put((rank, "ok", (probe, rows)))
    except BaseException as err:  # noqa: B036 - report to the parent
        results.put((rank, "error", repr(err)))
    destroy_parallel_groups()


def _merge(per_rank: list[list[dict]]) -> list[dict]:
    """One row per variant. Per repeat: the wall of the slower rank; sequential's send and
    return from the last rank to arrive (min over ranks: the transfer alone), compute and
    merge from the busiest rank. Reported: the fastest repeat (least disturbed by other jobs
    on the cores) and the median wall."""
    merged = []
    for rows in zip(*per_rank, strict=True):
        row = {key: rows[0][key] for key in rows[0] if not isinstance(rows[0][key], list)}
        for name in ("unpipelined", "sequential", "pipelined"):
            if name not in rows[0]:
                continue
            repeats = []
            for per_rank_run in zip(*(r[name] for r in rows), strict=True):
                run = {"wall_s": max(x["wall_s"] for x in per_rank_run),
                       "comm_s_per_rank": [x["comm_s"] for x in per_rank_run],
                       "bytes_per_rank": [x["bytes"] for x in per_rank_run],
                       "calls": per_rank_run[0]["calls"]}
                for phase in PHASES:
                    if phase in per_rank_run[0]:
                        pick = min if phase in COMM_PHASES else max
                        run[phase] = pick(x[phase] for x in per_rank_run)
                repeats.append(run)
            best = min(repeats, key=lambda x: x["wall_s"])
            row[name] = {**best, "wall_median_s": statistics.median(x["wall_s"] for x in repeats),
                         "walls_s": [x["wall_s"] for x in repeats]}
        if "pipelined" in row:
            seq, pipe = row["sequential"], row["pipelined"]
            comm_s = sum(seq.get(p, 0.0) for p in COMM_PHASES)
            row["phase_sum_s"] = sum(seq.get(p, 0.0) for p in PHASES)
            row["speedup"] = seq["wall_s"] / pipe["wall_s"]
            row["hidden"] = (seq["wall_s"] - pipe["wall_s"]) / comm_s if comm_s else None
        merged.append(row)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--levels", nargs="+", default=["1:1,2:1", "1:1,2:4"])
    parser.add_argument("--modes", nargs="+", default=["sampled", "all"])
    parser.add_argument("--micro", nargs="+", default=["1x0", "3x512", "1x256"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args, results), daemon=True)
             for r in range(WORLD)]
    for proc in procs:
        proc.start()
    got = dict((rank, (status, rows)) for rank, status, rows in
               (results.get(timeout=3600) for _ in range(WORLD)))
    for proc in procs:
        proc.join(timeout=30)
    errors = {r: rows for r, (status, rows) in got.items() if status != "ok"}
    if errors:
        sys.exit(f"workers failed: {errors}")
    probes = [got[r][1][0] for r in range(WORLD)]
    probe = {key: max(p[key] for p in probes) for key in probes[0]}
    print(f"probe: all-to-all, {probe['bytes'] / 1e6:.1f} MB to the peer, "
          f"{probe['comm_s'] * 1e3:.1f} ms, attention {probe['compute_s'] * 1e3:.1f} ms, "
          f"both overlapped {probe['overlapped_s'] * 1e3:.1f} ms", flush=True)
    rows = _merge([got[r][1][1] for r in range(WORLD)])
    for row in rows:
        parts = [f"{row['levels']:10s} {row['far_queries']:7s} {row['micro_batch'] or '-':6s}"]
        for name in ("unpipelined", "sequential", "pipelined"):
            if name in row:
                parts.append(f"{name} {row[name]['wall_s'] * 1e3:7.1f} "
                             f"({row[name]['wall_median_s'] * 1e3:.0f}) ms")
        if "pipelined" in row:
            parts.append("phases s/c/r/m " + "/".join(
                f"{row['sequential'].get(p, 0.0) * 1e3:.1f}" for p in PHASES))
            parts.append(f"sum {row['phase_sum_s'] * 1e3:.1f}")
            blocked = row["pipelined"]["comm_s_per_rank"]
            parts.append("blocked " + "/".join(f"{b * 1e3:.1f}" for b in blocked) + " ms")
            if row["hidden"] is not None:
                parts.append(f"hidden {row['hidden']:+.2f}")
        print("  ".join(parts), flush=True)
    if args.out:
        meta = {"command": " ".join(sys.argv), "torch": torch.__version__,
                "machine": platform.machine(), "cpus": os.cpu_count(), "world": WORLD,
                "tokens": args.tokens, "heads": args.heads, "kv_heads": args.kv_heads,
                "dim": args.dim, "dtype": "float32", "repeats": args.repeats,
                "loadavg_after": os.getloadavg()}  # other jobs on the same cores
        args.out.write_text(json.dumps({"meta": meta, "probe": probe, "rows": rows}, indent=1)
                            + "\n")


if __name__ == "__main__":
    main()
