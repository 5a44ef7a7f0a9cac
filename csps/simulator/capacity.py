"""Capacity search: the highest request rate served within SLOs, as Sarathi-Serve defines it
(algorithms.md §3): P99 TBT (every inter-token gap, pooled) <= p99_tbt_s and median scheduling
delay <= median_sched_delay_s, for one fixed workload (size, lengths, seed) whose arrivals are
a Poisson process (the workload's burstiness) at the probed rate. Each probe is a full
simulation. No torch.

Search: an exponential bracket from start_rate (doubling while probes pass, halving while they
fail), then bisection until the lowest failing rate is within rel_tol of the highest passing
one, which is the capacity. It assumes pass/fail is monotonic in the rate (past capacity,
queues only grow): every probe is then on the right side of the bracket, every pass below
every fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from csps.bench.workload import WorkloadConfig, build_workload
from csps.simulator.run import SimulationConfig, simulate

# The result keys a probe keeps (the whole result has per-request arrays).
PROBE_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
              "mean_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms",
              "mean_sched_delay_ms", "median_sched_delay_ms", "p99_sched_delay_ms")


@dataclass(frozen=True, slots=True)
class CapacitySLOs:
    p99_tbt_s: float  # P99 of the pooled inter-token latencies (vLLM's ITL)
    median_sched_delay_s: float = 2.0  # Sarathi-Serve's default

    def __post_init__(self) -> None:
        if not self.p99_tbt_s > 0 or not self.median_sched_delay_s > 0:
            raise ValueError(f"capacity SLOs must be > 0 s, got p99 TBT {self.p99_tbt_s} and "
                             f"median scheduling delay {self.median_sched_delay_s}")

    def is_met(self, metrics: dict) -> bool:
        """A probe passes when something completed and both SLOs hold."""
        return (metrics["completed"] > 0
                and metrics["p99_itl_ms"] <= self.p99_tbt_s * 1000.0
                and metrics["median_sched_delay_ms"] <= self.median_sched_delay_s * 1000.0)


@dataclass(frozen=True, slots=True)
class CapacitySearch:
    start_rate: float = 1.0  # req/s of the first probe
    rel_tol: float = 0.05  # stop when (lowest fail - highest pass) <= rel_tol * highest pass
    min_rate: float = 1e-3  # halving stops below this: capacity 0
    max_rate: float = 1e5  # doubling stops above this: capacity unbounded ("bracket" [x, None])

    def __post_init__(self) -> None:
        if not 0 < self.min_rate <= self.start_rate <= self.max_rate:
            raise ValueError(f"need 0 < min_rate <= start_rate <= max_rate, got {self.min_rate}"
                             f", {self.start_rate}, {self.max_rate}")
        if not 0 < self.rel_tol < 1:
            raise ValueError(f"rel_tol must be in (0, 1), got {self.rel_tol}")


Probe = Callable[[float], dict]  # rate (req/s) -> metrics with at least CapacitySLOs' keys


def find_capacity(probe: Probe, slos: CapacitySLOs, search: CapacitySearch = CapacitySearch(),
                  on_probe: Callable[[dict], None] | None = None) -> dict:
    """Bracket, then bisect (module docstring). Returns capacity (req/s, 0 if even min_rate
    fails), bracket [highest pass, lowest fail] (None where not found), probes (rate, passed,
    metrics, in the order run), slos and search."""
    probes: list[dict] = []
    passed_at, failed_at = None, None

    def run(rate: float) -> bool:
        nonlocal passed_at, failed_at
        metrics = probe(rate)
        entry = {"rate": rate, "passed": slos.is_met(metrics), "metrics": metrics}
        probes.append(entry)
        if on_probe is not None:
            on_probe(entry)
        if entry["passed"]:
            passed_at = rate if passed_at is None else max(passed_at, rate)
        else:
            failed_at = rate if failed_at is None else min(failed_at, rate)
        return entry["passed"]

    rate = search.start_rate
    step = 2.0 if run(rate) else 0.5
    while (passed_at is None or failed_at is None) and \
            search.min_rate <= rate * step <= search.max_rate:
        rate *= step
        run(rate)
    while passed_at is not None and failed_at is not None and passed_at < failed_at and \
            failed_at - passed_at > search.rel_tol * passed_at:
        run((passed_at + failed_at) / 2)
    return {"capacity": passed_at or 0.0, "bracket": [passed_at, failed_at],
            "num_probes": len(probes), "probes": probes,
            "slos": dataclasses.asdict(slos), "search": dataclasses.asdict(search)}


def probe_metrics(result: dict) -> dict:
    """A probe's summary of one simulation result."""
    metrics = {key: result[key] for key in PROBE_KEYS}
    simulator = result.get("simulator", {})
    metrics.update({key: simulator[key] for key in ("simulated_s", "wall_s", "iterations",
                                                    "num_preemptions") if key in simulator})
    return metrics


def simulation_probe(config: SimulationConfig, workload: WorkloadConfig) -> Probe:
    """Probe = simulate `workload` with its arrivals at the probed rate (same seed, so the
    same lengths and the same arrival pattern, scaled)."""
    def probe(rate: float) -> dict:
        specs = build_workload(dataclasses.replace(workload, request_rate=rate))
        return probe_metrics(simulate(config, specs))

    return probe
