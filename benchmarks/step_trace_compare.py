"""Price a real run's steps with the cost model, one by one: how much of the simulator's error
is the cost model's (the same steps, priced) rather than different decisions.

    # 1. the real run, writing its step trace
    csps serve smollm2-135m -sp 2 --scheduler loongserve --step-trace real-steps.jsonl ...
    csps bench serve ...
    # 2. price every step it ran, with the server's engine flags and the profile to judge
    .venv/bin/python benchmarks/step_trace_compare.py real-steps.jsonl -sp 2 \
        --scheduler loongserve --cost-model csps/costmodel/profiles/cpu-smollm2-135m-sp2.json \
        --out-dir benchmarks/results/step_trace [--sim-trace sim-steps.jsonl]

Steps are grouped by kind (decode, prefill chunks only, mixed, SP prefill) and by how many
prompts they carry. For each group: the steps, their measured and predicted seconds summed,
and the median of predicted / measured. With --sim-trace (a replay's `csps simulate
--step-trace`), the two runs' step counts and seconds per group are set side by side too.
Writes LABEL-steps.json and LABEL-steps.png (predicted vs measured, one point per step).
With --fit-out PATH the cost model's coefficients are also fitted on the trace's own steps
(NNLS, every 4th step held out, as `csps profile` fits its crafted steps) and written there:
a profile of this machine as it ran the workload, concurrency and all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from csps.cli import add_engine_args, config_from_args
from csps.contract.step_trace import TracedStep, read_step_trace
from csps.costmodel.profile_cli import fit_records, format_report
from csps.costmodel.work import iteration_work
from csps.scheduler.predictor import BUNDLED_PROFILE
from csps.simulator.loop import iteration_kind
from csps.simulator.run import SimulationConfig, build_simulator


def group_of(step: TracedStep) -> str:
    """The step's kind, with its number of prompts when it carries prefill chunks."""
    output = step.scheduler_output
    kind = iteration_kind(output)
    prompts = sum(1 for r in output.scheduled_requests if not r.is_decode)
    return kind if kind == "decode" else f"{kind} x{prompts}"


def summarise(steps: list[TracedStep], predicted: list[float] | None) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for i, step in enumerate(steps):
        g = groups.setdefault(group_of(step), {"steps": 0, "measured_s": 0.0,
                                               "predicted_s": 0.0, "ratios": []})
        g["steps"] += 1
        g["measured_s"] += step.seconds
        if predicted is not None:
            g["predicted_s"] += predicted[i]
            if step.seconds > 0:
                g["ratios"].append(predicted[i] / step.seconds)
    for g in groups.values():
        ratios = g.pop("ratios")
        g["median_predicted_over_measured"] = statistics.median(ratios) if ratios else None
        if predicted is None:
            del g["predicted_s"]
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]["measured_s"]))


def table(real: dict, sim: dict | None) -> str:
    head = "| steps | count | measured s | predicted s | median pred/meas |"
    rule = "|---|---|---|---|---|"
    if sim is not None:
        head += " replay count | replay s |"
        rule += "---|---|"
    lines = [head, rule]
    for name in dict.fromkeys([*real, *(sim or {})]):
        r = real.get(name, {"steps": 0, "measured_s": 0.0, "predicted_s": 0.0,
                            "median_predicted_over_measured": None})
        ratio = r["median_predicted_over_measured"]
        line = (f"| {name} | {r['steps']} | {r['measured_s']:.1f} | {r['predicted_s']:.1f} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |")
        if sim is not None:
            s = sim.get(name, {"steps": 0, "measured_s": 0.0})
            line += f" {s['steps']} | {s['measured_s']:.1f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(steps: list[TracedStep], predicted: list[float], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    by_group: dict[str, list[tuple[float, float]]] = {}
    for step, p in zip(steps, predicted, strict=True):
        by_group.setdefault(group_of(step).split(" ")[0], []).append((step.seconds, p))
    for name, pairs in sorted(by_group.items()):
        ax.scatter(*zip(*pairs, strict=True), s=8, label=name, alpha=0.7)
    top = max(max(s.seconds for s in steps), max(predicted)) * 1.2
    low = min(min(s.seconds for s in steps if s.seconds > 0), min(predicted)) / 1.2
    ax.plot([low, top], [low, top], color="black", linewidth=0.8, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step [s]")
    ax.set_ylabel("cost model's price of the same step [s]")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class _Measured:  # what fit_records reads of a profiled step
    kind: str
    works: list
    step_s: float
    execute_s: float


def fit_from_trace(steps: list[TracedStep], timer, name: str, base) -> object:
    """A FittedCostModel of the traced steps' measured times (zero-length steps left out)."""
    records = [_Measured(group_of(s).split(" ")[0], iteration_work(
        s.scheduler_output, timer.shape, timer.parallel, timer.block_size), s.seconds, s.seconds)
        for s in steps if s.seconds > 0]
    return fit_records(records, name=name, shape=timer.shape,
                       parallel=getattr(base, "parallel", {}),
                       machine={"fitted_from": "step trace"},
                       date=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", type=Path, help="the real run's --step-trace file")
    add_engine_args(parser)
    parser.set_defaults(cost_model=str(BUNDLED_PROFILE), model="smollm2-135m",
                        max_model_len=8192)
    parser.add_argument("--sim-trace", type=Path, default=None,
                        help="a replay's --step-trace file, to set beside the real steps")
    parser.add_argument("--label", default=None, help="file prefix (default: the trace's)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/step_trace"))
    parser.add_argument("--fit-out", type=Path, default=None,
                        help="also fit a cost model on the trace's steps and write it here")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    engine = config_from_args(args)
    simulator, _ = build_simulator(SimulationConfig(engine, model=engine.model.model))
    steps = read_step_trace(args.trace)
    if not steps:
        raise SystemExit(f"{args.trace}: no steps")
    predicted = [simulator.timer(step.scheduler_output).seconds for step in steps]
    real = summarise(steps, predicted)
    sim = summarise(read_step_trace(args.sim_trace), None) if args.sim_trace else None
    total_measured = sum(s.seconds for s in steps)
    report = {"trace": str(args.trace), "cost_model": engine.scheduler.cost_model,
              "steps": len(steps), "measured_s": total_measured,
              "predicted_s": sum(predicted), "groups": real, "replay_groups": sim}
    label = args.label or args.trace.stem
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{label}-steps.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(real, sim)
    (args.out_dir / f"{label}-steps.md").write_text(text)
    print(text)
    print(f"{len(steps)} steps: {total_measured:.1f} s measured, {sum(predicted):.1f} s "
          f"predicted")
    if args.fit_out is not None:
        fitted = fit_from_trace(steps, simulator.timer, args.fit_out.stem,
                                simulator.timer.cost_model)
        fitted.to_json(args.fit_out)
        report["fitted"] = {"path": str(args.fit_out), **fitted.to_dict()}
        print(format_report(fitted))
    if not args.no_plot:
        plot(steps, predicted, args.out_dir / f"{label}-steps.png",
             f"{label}: steps priced by {Path(engine.scheduler.cost_model).name}")
    return report


if __name__ == "__main__":
    main()
