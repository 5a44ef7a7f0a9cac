"""What a benchmark sends and when: WorkloadConfig -> list of RequestSpec. No torch.

Random workloads draw lengths uniformly in [len*(1-r), len*(1+r)] (r = random_range_ratio) and
arrivals from `arrivals.arrival_times`; trace workloads replay a file's lengths and timestamps
(or, with an explicit request_rate, its lengths only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from csps.bench.arrivals import arrival_times
from csps.bench.traces import TRACE_FORMATS, read_trace, scale_records

DATASETS = ("random", "trace")
DEFAULT_NUM_PROMPTS = 1000  # random workloads; a trace defaults to all its requests


@dataclass(frozen=True, slots=True)
class RequestSpec:
    arrival_s: float  # send time, seconds after the benchmark starts
    input_len: int  # intended prompt tokens
    output_len: int  # max_tokens asked for
    hash_ids: tuple[int, ...] = ()  # Mooncake prefix blocks (equal ids share prompt text)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    dataset_name: str = "random"  # "random" or "trace"
    num_prompts: int | None = None  # None: 1000 random requests, or the whole trace
    request_rate: float | None = None  # req/s; None: inf (random) or the trace's timestamps
    burstiness: float = 1.0  # gamma shape of the gaps; 1 = Poisson
    random_input_len: int = 1024  # tokens
    random_output_len: int = 128  # tokens
    random_range_ratio: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)]
    dataset_path: str | None = None  # trace file
    trace_format: str | None = None  # None: detected from the file
    time_scale: float = 1.0  # multiplies the trace's inter-arrival times
    length_scale: float = 1.0  # multiplies the trace's lengths (at least 1 token)
    max_input_len: int | None = None  # prompts are clipped to this many tokens
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset_name not in DATASETS:
            raise ValueError(f"dataset_name must be one of {DATASETS}, got {self.dataset_name!r}")
        if self.dataset_name == "trace" and not self.dataset_path:
            raise ValueError("dataset_name 'trace' needs a dataset_path")
        if self.trace_format is not None and self.trace_format not in TRACE_FORMATS:
            raise ValueError(f"trace_format must be one of {TRACE_FORMATS}, "
                             f"got {self.trace_format!r}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf = all at once), "
                             f"got {self.request_rate}")
        if self.random_input_len < 1 or self.random_output_len < 1:
            raise ValueError("random_input_len and random_output_len must be >= 1")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), "
                             f"got {self.random_range_ratio}")
        for name in ("burstiness", "time_scale", "length_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_input_len is not None and self.max_input_len < 1:
            raise ValueError(f"max_input_len must be >= 1, got {self.max_input_len}")


def build_workload(config: WorkloadConfig) -> list[RequestSpec]:
    """The requests of one run, in send order."""
    if config.dataset_name == "trace":
        return _trace_workload(config)
    num = config.num_prompts or DEFAULT_NUM_PROMPTS
    rng = np.random.default_rng(config.seed)
    input_lens = _uniform_lengths(rng, config.random_input_len, config.random_range_ratio, num)
    output_lens = _uniform_lengths(rng, config.random_output_len, config.random_range_ratio, num)
    if config.max_input_len is not None:
        input_lens = np.minimum(input_lens, config.max_input_len)
    times = arrival_times(num, config.request_rate or math.inf, config.burstiness, config.seed)
    return [RequestSpec(t, int(i), int(o))
            for t, i, o in zip(times, input_lens, output_lens, strict=True)]


def _uniform_lengths(rng: np.random.Generator, length: int, ratio: float, num: int) -> np.ndarray:
    low = max(1, math.floor(length * (1 - ratio)))
    high = max(low, math.ceil(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=num)


def _trace_workload(config: WorkloadConfig) -> list[RequestSpec]:
    records = read_trace(config.dataset_path, config.trace_format)[:config.num_prompts]
    records = scale_records(records, config.time_scale, config.length_scale, config.max_input_len)
    if config.request_rate is not None or any(r.timestamp_s is None for r in records):
        times = arrival_times(len(records), config.request_rate or math.inf, config.burstiness,
                              config.seed)
    else:
        times = [r.timestamp_s for r in records]
    specs = [RequestSpec(t, r.input_len, r.output_len, r.hash_ids)
             for t, r in zip(times, records, strict=True)]
    return sorted(specs, key=lambda spec: spec.arrival_s)
