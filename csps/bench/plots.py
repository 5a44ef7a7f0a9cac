"""PNG plots of benchmark results (matplotlib, optional: without it plotting is skipped).

`plot_run`: CDFs of TTFT and ITL and each request's E2E latency and TTFT against its send time.
`plot_comparison`: per-metric ratios of several runs to a baseline (>1 = better).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    return Figure(figsize=(width, height), layout="constrained")


def _cdf(axis, values_ms: list[float], title: str) -> None:
    values = np.sort(np.asarray(values_ms, dtype=float))
    if values.size:
        axis.plot(values, np.arange(1, values.size + 1) / values.size, drawstyle="steps-post")
    axis.set(title=title, xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
    axis.grid(alpha=0.3)


def plot_run(result: dict, path: str | Path, title: str = "") -> Path:
    """Three panels from a result's per-request arrays; failed requests are left out."""
    ok = [i for i, error in enumerate(result["errors"]) if not error]
    ttfts_ms = [result["ttfts"][i] * 1000 for i in ok]
    itls_ms = [gap * 1000 for i in ok for gap in result["itls"][i]]
    figure = _figure(15, 4.2)
    cdf_ttft, cdf_itl, timeline = figure.subplots(1, 3)
    _cdf(cdf_ttft, ttfts_ms, "TTFT CDF")
    _cdf(cdf_itl, itls_ms, "ITL CDF")
    starts = [result["start_times"][i] for i in ok]
    timeline.scatter(starts, [result["latencies"][i] * 1000 for i in ok], s=10, label="E2E")
    timeline.scatter(starts, ttfts_ms, s=10, marker="x", label="TTFT")
    failed = [result["start_times"][i] for i, e in enumerate(result["errors"]) if e]
    if failed:
        timeline.scatter(failed, [0] * len(failed), s=14, color="red", label="failed")
    timeline.set(title="Latency over time", xlabel="send time (s)", ylabel="ms")
    timeline.legend()
    timeline.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_comparison(labels: list[str], ratios: dict[str, list[float | None]],
                    path: str | Path, baseline: str) -> Path:
    """Grouped bars: for each metric, each run's ratio to the baseline (missing = no bar)."""
    figure = _figure(max(6.0, 1.1 * len(ratios) + 2), 4.5)
    axis = figure.subplots()
    width = 0.8 / max(1, len(labels))
    positions = np.arange(len(ratios))
    for k, label in enumerate(labels):
        heights = [np.nan if r[k] is None else r[k] for r in ratios.values()]
        axis.bar(positions + k * width - 0.4 + width / 2, heights, width, label=label)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks(positions, list(ratios), rotation=30, ha="right")
    axis.set(ylabel=f"ratio vs {baseline} (>1 = better)", title=f"Runs compared to {baseline}")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=110)
    return Path(path)
