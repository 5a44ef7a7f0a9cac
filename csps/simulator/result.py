"""A simulation's result: the same JSON as `csps bench serve` (csps.bench.metrics; per request
`cached_tokens`, the prompt tokens its first admission found in the prefix cache), plus each
request's scheduling delay (Sarathi-Serve's: from its send to the start of the first iteration
that runs it; `scheduling_delays` in s, None if never scheduled, and their mean / median / p99
in ms), plus the prefix cache's hits over every replica (`prefix_cache_queries`: prompt tokens
looked up, `prefix_cache_hits`: of those found cached, `prefix_cache_hit_rate`; vLLM's
counters), plus the simulator's own figures under "simulator" (iterations by kind, busy time per
rank, predicted bytes per phase, preemptions, prefix-cache hits per replica, wall time). No torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from csps.bench.client import RequestResult
from csps.bench.metrics import GoodputSLOs, summarize
from csps.simulator.loop import RequestRecord, Simulator


def request_result(record: RequestRecord) -> RequestResult:
    """The bench client's view of a simulated request: times from its send."""
    send = record.send_s if record.send_s is not None else record.arrival_s
    times = record.token_times
    if record.error or not times:
        return RequestResult(record.input_len, 0, start_s=send,
                             error=record.error or "no token generated")
    return RequestResult(record.input_len, len(times), ttft_s=times[0] - send,
                         itls_s=[b - a for a, b in zip(times, times[1:], strict=False)],
                         latency_s=(record.finish_s or times[-1]) - send, start_s=send,
                         cached_tokens=record.cached_tokens)


def scheduling_delays(records: Sequence[RequestRecord]) -> dict:
    """Per request (s, None if never scheduled) and mean / median / p99 over the scheduled (ms;
    0 when none was)."""
    delays = [None if r.first_scheduled_s is None else r.first_scheduled_s - (
        r.send_s if r.send_s is not None else r.arrival_s) for r in records]
    values_ms = np.asarray([d for d in delays if d is not None] or [0.0]) * 1000.0
    return {"scheduling_delays": delays,
            "mean_sched_delay_ms": float(np.mean(values_ms)),
            "median_sched_delay_ms": float(np.median(values_ms)),
            "p99_sched_delay_ms": float(np.percentile(values_ms, 99))}


def prefix_cache_counts(scheduler) -> dict:
    """One scheduler's cumulative prefix-cache queries and hits (tokens), and their ratio (0
    with no query, or with a scheduler without a prefix cache)."""
    stats = getattr(scheduler, "prefix_cache_stats", None)
    queries = int(getattr(stats, "queries", 0))
    hits = int(getattr(stats, "hits", 0))
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0}


def prefix_cache_summary(schedulers: Sequence) -> dict:
    """prefix_cache_counts summed over the replicas."""
    counts = [prefix_cache_counts(s) for s in schedulers]
    queries = sum(c["prefix_cache_queries"] for c in counts)
    hits = sum(c["prefix_cache_hits"] for c in counts)
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0}


def simulator_summary(simulator: Simulator, duration_s: float) -> dict:
    """Per replica and in total: iterations, busy seconds and utilisation per SP rank, bytes."""
    replicas = []
    comm: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for scheduler, stats in zip(simulator.schedulers, simulator.stats, strict=True):
        replicas.append({
            "iterations": stats.iterations, "iterations_by_kind": stats.iterations_by_kind,
            "busy_s": stats.busy_s, "rank_busy_s": stats.rank_busy_s,
            "rank_utilization": [b / duration_s for b in stats.rank_busy_s],
            "comm_bytes": stats.comm_bytes, "num_preemptions": scheduler.num_preemptions,
            **prefix_cache_counts(scheduler)})
        for phase, num_bytes in stats.comm_bytes.items():
            comm[phase] = comm.get(phase, 0) + num_bytes
        for kind, count in stats.iterations_by_kind.items():
            kinds[kind] = kinds.get(kind, 0) + count
    return {"iterations": sum(s.iterations for s in simulator.stats),
            "iterations_by_kind": kinds, "comm_bytes": comm,
            "num_preemptions": sum(s.num_preemptions for s in simulator.schedulers),
            "simulated_s": simulator.clock, "wall_s": simulator.wall_s, "replicas": replicas}


def simulation_result(records: Sequence[RequestRecord], simulator: Simulator,
                      slos: GoodputSLOs | None = None) -> dict:
    """vLLM's benchmark keys for the simulated run, then "simulator"."""
    results = [request_result(r) for r in records]
    start = min((r.arrival_s for r in records), default=0.0)
    end = max((r.finish_s for r in records if r.finish_s is not None), default=start)
    duration = max(end - start, 1e-9)
    summary = summarize(results, duration, slos)
    summary.update(scheduling_delays(records))
    summary.update(prefix_cache_summary(simulator.schedulers))
    summary["simulator"] = simulator_summary(simulator, duration)
    return summary
