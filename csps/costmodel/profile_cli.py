"""`csps profile MODEL`: measure engine steps here, fit a FittedCostModel, save it as JSON.

Every 4th measured step is held out of the fit; the held-out steps' absolute relative error
of the predicted step time (median and p90, overall and per workload kind) goes into the
JSON's "fit" and to stdout. Import-light: argparse only until the command runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HOLD_OUT_EVERY = 4  # steps i with i % 4 == 3 are held out
STEP_COLUMNS = ["num_tokens", "num_seqs", "num_sampled", "attn_pairs", "decode_kv_tokens",
                "total_bytes", "overlappable_bytes", "num_collectives"]


def add_profile_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile", help="Measure step times here and fit a cost model (JSON).",
        description="Drive the engine with crafted workloads (local and SP prefills, chunked "
                    "prefill, local and spread decode batches), fit per-token, per-pair, "
                    "per-byte ... coefficients by NNLS and report their held-out error.")
    parser.add_argument("model", metavar="MODEL", help="Model name, HF folder or .gguf file.")
    parser.add_argument("--sp-size", type=int, default=2, help="SP workers (default: 2).")
    parser.add_argument("--out", default=None, help="Output JSON (default: "
                        "cpu-MODEL-spP.json in the current folder).")
    parser.add_argument("--quick", action="store_true",
                        help="One SP algorithm, short prompts (about a minute).")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="Longest prompt profiled (default: 3072, 512 with --quick).")
    parser.add_argument("--seed", type=int, default=0, help="Prompt seed (default: 0).")
    parser.add_argument("--sp-attention", nargs="+", default=[], metavar="ALGO",
                        help="Profile only these SP algorithms (default: all four).")
    parser.add_argument("--whole-prompts", action="store_true",
                        help="Also batches of whole prompts up to --max-tokens, each on a "
                             "rank of its own, and long-context decodes: the local steps "
                             "of --scheduler loongserve (slow: a 2-worker profile at "
                             "--max-tokens 7000 took 26 min on 2 cores).")
    parser.set_defaults(handler=profile_command, parser=parser)


def profile_command(args: argparse.Namespace) -> int:
    from csps.costmodel.profile import ProfileConfig

    try:
        config = ProfileConfig(args.model, sp_size=args.sp_size, quick=args.quick,
                               max_tokens=args.max_tokens, seed=args.seed,
                               sp_attention=tuple(args.sp_attention),
                               whole_prompts=args.whole_prompts)
    except ValueError as exc:
        args.parser.error(str(exc))
    model = profile(config, args.out)
    print(format_report(model))
    return 0


def profile(config, out: str | Path | None = None):
    """Measure, fit on the kept steps, score the held-out ones, save; returns the model."""
    from tqdm import tqdm

    from csps.costmodel.profile import (
        model_shape,
        num_workloads,
        profile_geometry,
        run_profile,
        token_budget,
    )

    shape, max_position = model_shape(config.model)
    load_before = os.getloadavg()
    start = time.perf_counter()
    max_len, threshold = profile_geometry(config, max_position)
    with tqdm(total=num_workloads(config, max_len, threshold), desc="csps profile",
              unit="workload") as bar:
        def progress(num_steps: int) -> None:
            bar.set_postfix(steps=num_steps, refresh=False)
            bar.update(1)
        records = run_profile(config, shape, max_position, progress)
    machine = machine_info(load_before, time.perf_counter() - start)
    parallel = {"sequence_parallel_size": config.sp_size, "tensor_parallel_size": 1,
                "sp_attention": list(config.algorithms), "sp_decode": "qmove",
                "block_size": 16, "max_prompt_tokens": max_len, "long_prompt_threshold":
                threshold, "max_num_batched_tokens": token_budget(threshold),
                "executor": "multiproc" if config.sp_size > 1 else "uniproc",
                "whole_prompts": config.whole_prompts}
    model = fit_records(records, name=f"cpu-{shape.name}-sp{config.sp_size}", shape=shape,
                        parallel=parallel, machine=machine,
                        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    path = Path(out or f"{model.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_profile(path, model.to_dict(), [step_row(r, i) for i, r in enumerate(records)])
    print(f"wrote {path}", file=sys.stderr)
    return model


def write_profile(path: Path, model: dict, steps: list[dict]) -> None:
    """The model's JSON with the measured steps appended, one line each (to refit later)."""
    head = json.dumps({**model, "step_columns": STEP_COLUMNS}, indent=2)
    rows = ",\n    ".join(json.dumps(row) for row in steps)
    path.write_text(f'{head[:-2]},\n  "steps": [\n    {rows}\n  ]\n}}\n')


def step_row(record, index: int) -> dict:
    """One measured step, compactly: its kind, times and each rank's work (STEP_COLUMNS)."""
    return {"kind": record.kind, "sp_attention": record.sp_attention,
            "step_s": round(record.step_s, 6), "execute_s": round(record.execute_s, 6),
            "held_out": index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1,
            "ranks": [[w.num_tokens, w.num_seqs, w.num_sampled, round(w.attn_pairs, 2),
                       w.decode_kv_tokens, w.total_bytes, w.overlappable_bytes,
                       w.num_collectives] for w in record.works]}


def fit_records(records: Sequence, **info):
    """FittedCostModel fitted on the kept steps; its "fit" holds the held-out errors."""
    import numpy as np

    from csps.costmodel.fitted import FittedCostModel

    held = [i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 for i in range(len(records))]
    train = [r for r, h in zip(records, held, strict=True) if not h]
    test = [r for r, h in zip(records, held, strict=True) if h]
    if len(train) < 8 or not test:
        raise ValueError(f"too few measured steps to fit ({len(records)})")
    model = FittedCostModel.fit_steps([r.works for r in train], [r.step_s for r in train],
                                      **info)

    def errors(rows) -> dict:
        errs = np.array(model.relative_errors([r.works for r in rows], [r.step_s for r in rows]))
        return {"num_steps": len(rows), "median_rel_err": float(np.median(errs)),
                "p90_rel_err": float(np.percentile(errs, 90))}

    kinds = sorted({r.kind for r in test})
    fit = {"target": "wall time of LLMEngine.step()", "method": "NNLS, relative error",
           "hold_out": f"every {HOLD_OUT_EVERY}th step", "train": errors(train),
           "held_out": errors(test),
           "held_out_by_kind": {k: errors([r for r in test if r.kind == k]) for k in kinds},
           "median_execute_share": float(np.median([r.execute_s / r.step_s for r in records]))}
    return FittedCostModel(**{**model.coefficients, **info, "fit": fit})


def machine_info(load_before: tuple[float, float, float], seconds: float) -> dict:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    return {"host": platform.node(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "device": "cpu", "torch": torch_version,
            "python": platform.python_version(), "profile_seconds": round(seconds, 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def format_report(model) -> str:
    lines = [f"cost model {model.name} (held-out: {model.fit['hold_out']})"]
    lines += [f"  {name:24s} {value:.4g}" for name, value in model.coefficients.items()]
    for label, err in [("held-out", model.fit["held_out"]), ("train", model.fit["train"]),
                       *model.fit["held_out_by_kind"].items()]:
        lines.append(f"  {label:24s} median {100 * err['median_rel_err']:5.1f}%  "
                     f"p90 {100 * err['p90_rel_err']:5.1f}%  ({err['num_steps']} steps)")
    return "\n".join(lines)
