"""Benchmark metrics from per-request records, defined as vLLM's benchmark defines them
(algorithms.md §5), plus goodput and LoongServe's normalised latencies. No torch.

TTFT: send -> first token chunk. ITL: every gap between consecutive chunks, pooled over
requests. TPOT per request: (latency - TTFT) / (output_len - 1). E2E: send -> end of stream.
Only successful requests enter the statistics and token totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csps.bench.client import RequestResult

SLO_METRICS = ("ttft", "tpot", "e2el")
PERCENTILES = (90, 99)


@dataclass(frozen=True, slots=True)
class GoodputSLOs:
    """Per-request limits in ms; a request counts toward goodput when it meets every one set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self) -> None:
        for name in SLO_METRICS:
            value = getattr(self, f"{name}_ms")
            if value is not None and not value > 0:
                raise ValueError(f"goodput SLO {name} must be > 0 ms, got {value}")

    @classmethod
    def parse(cls, items: list[str]) -> GoodputSLOs:
        """From ['ttft:500', 'tpot:50'] (vLLM's --goodput syntax)."""
        values = {}
        for item in items:
            name, sep, value = item.partition(":")
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"bad goodput SLO {item!r}: use NAME:MS with NAME one of "
                                 f"{', '.join(SLO_METRICS)}")
            values[f"{name}_ms"] = float(value)
        return cls(**values)

    @property
    def is_set(self) -> bool:
        return any(getattr(self, f"{name}_ms") is not None for name in SLO_METRICS)

    def is_met(self, ttft_s: float, tpot_s: float, e2el_s: float) -> bool:
        measured = {"ttft": ttft_s, "tpot": tpot_s, "e2el": e2el_s}
        return all(getattr(self, f"{name}_ms") is None
                   or measured[name] * 1000.0 <= getattr(self, f"{name}_ms")
                   for name in SLO_METRICS)


def tpot_s(result: RequestResult) -> float:
    """Time per output token after the first; 0 for single-token outputs (as vLLM)."""
    if result.output_len <= 1:
        return 0.0
    return (result.latency_s - result.ttft_s) / (result.output_len - 1)


def summarize(results: list[RequestResult], duration_s: float,
              slos: GoodputSLOs | None = None) -> dict:
    """vLLM's result keys (statistics in ms, per-request arrays in s) for one run."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in results if r.success]
    total_input = sum(r.input_len for r in done)
    total_output = sum(r.output_len for r in done)
    summary: dict = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    if slos is not None and slos.is_set:
        good = sum(slos.is_met(r.ttft_s, tpot_s(r), r.latency_s) for r in done)
        summary["request_goodput"] = good / duration_s
    samples = {"ttft": [r.ttft_s for r in done],
               "tpot": [tpot_s(r) for r in done if r.output_len > 1],
               "itl": [gap for r in done for gap in r.itls_s],
               "e2el": [r.latency_s for r in done]}
    for name, values in samples.items():
        summary.update(_statistics_ms(name, values))
    summary.update(_normalized_latencies_ms(done))
    summary.update(cached_token_totals(done))
    summary.update(per_request_arrays(results))
    return summary


def _statistics_ms(name: str, values_s: list[float]) -> dict[str, float]:
    values_ms = np.asarray(values_s, dtype=float) * 1000.0 if values_s else np.zeros(1)
    stats = {f"mean_{name}_ms": float(np.mean(values_ms)),
             f"median_{name}_ms": float(np.median(values_ms)),
             f"std_{name}_ms": float(np.std(values_ms))}
    for p in PERCENTILES:
        stats[f"p{p}_{name}_ms"] = float(np.percentile(values_ms, p))
    return stats


def _normalized_latencies_ms(done: list[RequestResult]) -> dict[str, float]:
    """LoongServe's per-token latencies, means over requests."""
    def mean(values: list[float]) -> float:
        return float(np.mean(values)) * 1000.0 if values else 0.0

    return {
        "mean_normalized_latency_ms": mean([r.latency_s / (r.input_len + r.output_len)
                                            for r in done if r.input_len + r.output_len]),
        "mean_latency_per_output_token_ms": mean([r.latency_s / r.output_len
                                                  for r in done if r.output_len]),
        "mean_ttft_per_input_token_ms": mean([r.ttft_s / r.input_len
                                              for r in done if r.input_len]),
    }


def cached_token_totals(done: list[RequestResult]) -> dict[str, float | int | None]:
    """Prompt tokens the server reported served from its prefix cache, over the successful
    requests that reported it (usage.prompt_tokens_details.cached_tokens); None if none did."""
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    return {"total_cached_tokens": sum(cached) if cached else None,
            "mean_cached_tokens": float(np.mean(cached)) if cached else None}


def per_request_arrays(results: list[RequestResult]) -> dict[str, list]:
    """Every request (failed ones too, with their error), times in seconds."""
    return {"input_lens": [r.input_len for r in results],
            "output_lens": [r.output_len if r.success else 0 for r in results],
            "ttfts": [r.ttft_s for r in results],
            "itls": [list(r.itls_s) for r in results],
            "latencies": [r.latency_s for r in results],
            "start_times": [r.start_s for r in results],
            "errors": [r.error for r in results],
            "cached_tokens": [r.cached_tokens for r in results]}
