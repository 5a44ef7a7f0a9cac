"""The workload flags shared by `csps bench serve` and `csps simulate` (vLLM's names), and the
WorkloadConfig they describe. No torch, no httpx: the simulator's CLI imports this.
"""

from __future__ import annotations

import argparse
import dataclasses

from csps.bench.traces import TRACE_FORMATS
from csps.bench.workload import DATASETS, WorkloadConfig


def add_workload_args(parser: argparse.ArgumentParser, for_client: bool = True) -> None:
    """A "workload" group. for_client adds what only a real client has: --ignore-eos,
    --num-warmups and --seed (the simulator ignores EOS always and takes the engine's --seed)."""
    load = parser.add_argument_group("workload")
    load.add_argument("--dataset-name", choices=DATASETS, default="random",
                      help="Random lengths or a trace file (default: %(default)s).")
    load.add_argument("--dataset-path", default=None, help="Trace file for --dataset-name trace.")
    load.add_argument("--trace-format", choices=TRACE_FORMATS, default=None,
                      help="Trace format (default: detected from the file).")
    load.add_argument("--num-prompts", type=int, default=None,
                      help="Requests to send (default: 1000, or the whole trace).")
    load.add_argument("--request-rate", type=float, default=None,
                      help="Requests per second, 'inf' = all at once (default: inf, or a "
                           "trace's own timestamps; given with a trace, it replaces them).")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="Gamma shape of arrival gaps: 1 = Poisson, <1 burstier "
                           "(default: %(default)s).")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="Most requests in flight at once (default: unlimited).")
    load.add_argument("--random-input-len", type=int, default=1024,
                      help="Prompt tokens (default: %(default)s).")
    load.add_argument("--random-output-len", type=int, default=128,
                      help="Output tokens (default: %(default)s).")
    load.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="Lengths uniform in [len*(1-r), len*(1+r)] (default: %(default)s).")
    load.add_argument("--time-scale", type=float, default=1.0,
                      help="Multiplies a trace's inter-arrival times (default: %(default)s).")
    load.add_argument("--length-scale", type=float, default=1.0,
                      help="Multiplies a trace's input and output lengths, at least 1 token "
                           "(default: %(default)s).")
    load.add_argument("--max-input-len", type=int, default=None,
                      help="Clip prompts to this many tokens.")
    if not for_client:
        return
    load.add_argument("--ignore-eos", action="store_true",
                      help="Ask for exactly max_tokens (the 'ignore_eos' body field).")
    load.add_argument("--num-warmups", type=int, default=0,
                      help="Warm-up requests sent first, not measured (default: %(default)s).")
    load.add_argument("--seed", type=int, default=0, help="Seed (default: %(default)s).")


def workload_config_from_args(args: argparse.Namespace) -> WorkloadConfig:
    """The WorkloadConfig of parsed workload flags (ValueError from its checks)."""
    return WorkloadConfig(**{f.name: getattr(args, f.name)
                             for f in dataclasses.fields(WorkloadConfig)})
