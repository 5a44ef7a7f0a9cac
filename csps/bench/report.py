"""A run's result: the printed summary (vLLM's layout), the default file name, the JSON file."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path

RULE_WIDTH = 50
SECTIONS = (("Time to First Token", "ttft"), ("Time per Output Token (excl. 1st token)", "tpot"),
            ("Inter-token Latency", "itl"), ("End-to-end Latency", "e2el"))
# shown when the server reported any of them (its /metrics counters, the usage objects)
PREFIX_CACHE_ROWS = {"Prefix cache hit rate": "prefix_cache_hit_rate",
                     "Prefix cache queried tokens": "prefix_cache_queries",
                     "Prefix cache hit tokens": "prefix_cache_hits",
                     "Mean cached tokens per request": "mean_cached_tokens",
                     "Trace prefix reuse (ideal)": "trace_reuse"}


def format_summary(result: dict) -> str:
    """The main figures of a result dict, one per line."""
    lines = [" Serving Benchmark Result ".center(RULE_WIDTH, "=")]

    def row(name: str, value, digits: int = 2) -> None:
        text = "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float)
                                            else str(value))
        lines.append(f"{name + ':':<40}{text:>10}")

    row("Successful requests", result["completed"])
    row("Failed requests", result["failed"])
    row("Benchmark duration (s)", result["duration"])
    row("Total input tokens", result["total_input_tokens"])
    row("Total generated tokens", result["total_output_tokens"])
    row("Request throughput (req/s)", result["request_throughput"])
    row("Request goodput (req/s)", result["request_goodput"])
    row("Output token throughput (tok/s)", result["output_throughput"])
    row("Total token throughput (tok/s)", result["total_token_throughput"])
    for title, name in SECTIONS:
        lines.append(f" {title} ".center(RULE_WIDTH, "-"))
        for stat in ("mean", "median", "std", "p90", "p99"):
            row(f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms)",
                result[f"{stat}_{name}_ms"])
    lines.append(" Normalised latency (LoongServe) ".center(RULE_WIDTH, "-"))
    row("Mean latency per token (ms)", result["mean_normalized_latency_ms"], 3)
    row("Mean latency per output token (ms)", result["mean_latency_per_output_token_ms"], 3)
    row("Mean TTFT per input token (ms)", result["mean_ttft_per_input_token_ms"], 3)
    if any(result.get(key) is not None for key in PREFIX_CACHE_ROWS.values()):
        lines.append(" Prefix cache ".center(RULE_WIDTH, "-"))
        for name, key in PREFIX_CACHE_ROWS.items():
            row(name, result.get(key), 2 if "tokens" in name else 3)
    lines.append("=" * RULE_WIDTH)
    errors = sorted({e for e in result.get("errors", []) if e})
    lines += [f"error: {e}" for e in errors[:5]]
    return "\n".join(lines)


def default_filename(label: str, request_rate: float | None, max_concurrency: int | None,
                     model_id: str, when: datetime | None = None, is_replay: bool = False) -> str:
    """'{label}-{rate}qps[-concurrency{n}]-{model}-{YYYYmmdd-HHMMSS}.json'; a trace replayed at
    its own timestamps has 'trace' for '{rate}qps'."""
    if is_replay and request_rate is None:
        rate = "trace"
    elif request_rate is None or math.isinf(request_rate):
        rate = "infqps"
    else:
        rate = f"{request_rate:g}qps"
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency else ""
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_id).name or model_id)
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{label}-{rate}{concurrency}-{model}-{stamp}.json"


def save_result(result: dict, result_dir: str | Path, filename: str) -> Path:
    """Write the result JSON (non-finite floats as null); returns its path."""
    path = Path(result_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result)) + "\n")
    return path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
