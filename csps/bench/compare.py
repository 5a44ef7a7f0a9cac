"""Side-by-side comparison of result files (`csps bench compare`): a markdown table of the main
metrics with each run's ratio to a baseline, >1 meaning better (baseline/this for latencies,
this/baseline for throughputs). Reads only vLLM's result keys, so it takes `csps simulate`
results and vLLM's own as well. No torch.
"""

from __future__ import annotations

import json
from pathlib import Path

# (result key, shown name, direction): +1 higher is better, -1 lower is better, 0 no ratio.
METRICS = (
    ("completed", "completed", 0), ("failed", "failed", 0), ("duration", "duration (s)", 0),
    ("request_throughput", "request throughput (req/s)", 1),
    ("request_goodput", "request goodput (req/s)", 1),
    ("output_throughput", "output throughput (tok/s)", 1),
    ("total_token_throughput", "total token throughput (tok/s)", 1),
    *((f"{stat}_{name}_ms", f"{stat} {name.upper()} (ms)", -1)
      for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p90", "p99")),
)


def load_results(paths: list[str | Path]) -> tuple[list[str], list[dict]]:
    """(labels, results): a run's label is its 'label' key, else its file name; repeated labels
    get '#index' appended."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    labels = [str(r.get("label") or (r.get("config") or {}).get("label") or Path(p).stem)
              for p, r in zip(paths, results, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [label if labels.count(label) == 1 else f"{label}#{i}"
                  for i, label in enumerate(labels)]
    return labels, results


def baseline_index(labels: list[str], baseline: str | int | None) -> int:
    """Index of the baseline run: a label, or a 0-based index; None is the first run."""
    if baseline is None:
        return 0
    if str(baseline) in labels:
        return labels.index(str(baseline))
    if str(baseline).isdigit() and int(baseline) < len(labels):
        return int(baseline)
    raise ValueError(f"baseline {baseline!r} is neither a label ({', '.join(labels)}) nor an "
                     f"index below {len(labels)}")


def ratio(value: float | None, base: float | None, direction: int) -> float | None:
    """This run relative to the baseline, >1 = better; None when undefined."""
    if direction == 0 or value is None or base is None:
        return None
    better, worse = (value, base) if direction > 0 else (base, value)
    if worse == 0:
        return 1.0 if better == 0 else None
    return better / worse


def ratios_to_baseline(results: list[dict], base: int) -> dict[str, list[float | None]]:
    """Metric name -> each run's ratio, for the metrics with a direction and a value."""
    ratios = {name: [ratio(r.get(key), results[base].get(key), direction) for r in results]
              for key, name, direction in METRICS if direction}
    return {name: values for name, values in ratios.items() if any(v is not None for v in values)}


def markdown_table(labels: list[str], results: list[dict], base: int) -> str:
    header = ["metric", *(f"{label} (baseline)" if i == base else label
                          for i, label in enumerate(labels))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, name, direction in METRICS:
        cells = [name]
        for i, result in enumerate(results):
            cell = _format(result.get(key))
            factor = ratio(result.get(key), results[base].get(key), direction)
            if i != base and factor is not None:
                cell += f" ({factor:.2f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nRatios (x) are vs {labels[base]}; >1 = better (baseline/this for latencies, "
                 "this/baseline for throughputs).")
    return "\n".join(lines)


def _format(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def compare_files(paths: list[str | Path], baseline: str | None = None,
                  out_plot: str | Path | None = None, out_md: str | Path | None = None) -> str:
    """The markdown table for the result files; also writes it to `out_md` and the ratio bar
    chart to `out_plot` when given."""
    labels, results = load_results(paths)
    base = baseline_index(labels, baseline)
    table = markdown_table(labels, results, base)
    if out_md:
        Path(out_md).write_text(table + "\n")
    if out_plot:
        from csps.bench.plots import plot_comparison

        plot_comparison(labels, ratios_to_baseline(results, base), out_plot, labels[base])
    return table
