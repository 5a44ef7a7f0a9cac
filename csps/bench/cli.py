"""`csps bench serve` (benchmark an OpenAI-compatible server) and `csps bench compare` (compare
result files): argparse only. Flag names and meanings follow `vllm bench serve`; the handlers
import their work lazily so that `csps --help` stays light.
"""

from __future__ import annotations

import argparse
import sys

from csps.bench.client import ENDPOINTS, PROMPT_FORMS
from csps.bench.workload_args import add_workload_args


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="Benchmark a server or compare results.",
                                  description="Benchmark an OpenAI-compatible server.")
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    _add_serve_parser(commands)
    _add_compare_parser(commands)


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="Send a workload to a server and measure it (vLLM bench serve semantics).",
        description="Send a random or trace workload to an OpenAI-compatible server (csps, vLLM, "
                    "SGLang, llama.cpp) and report TTFT, TPOT, ITL, E2E latency, throughput and "
                    "goodput.")
    server = serve.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="Server address (default: %(default)s).")
    server.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS,
                        help="API route (default: %(default)s).")
    server.add_argument("--model", default=None,
                        help="Model name to request (default: the first of GET /v1/models).")
    server.add_argument("--tokenizer", default=None,
                        help="Tokenizer for building prompts: a csps model name, .gguf or HF "
                             "folder (default: --model).")
    server.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
    server.add_argument("--timeout", type=float, default=3600.0, dest="timeout_s",
                        help="Seconds per request, stream included (default: %(default)s).")
    server.add_argument("--prompt-form", choices=PROMPT_FORMS, default="auto",
                        help="Send prompts as text or token ids; auto: token ids on "
                             "/v1/completions for traces with prefix hash_ids, so shared "
                             "blocks are the same tokens on the server (default: %(default)s).")
    add_workload_args(serve)
    out = serve.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                     help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000.")
    out.add_argument("--label", default="openai",
                     help="Name of the run, e.g. sps2-csa (default: %(default)s).")
    out.add_argument("--save-result", action="store_true", help="Write the result JSON.")
    out.add_argument("--result-dir", default=".", help="Folder for it (default: %(default)s).")
    out.add_argument("--result-filename", default=None,
                     help="File name (default: LABEL-RATEqps-MODEL-TIMESTAMP.json).")
    out.add_argument("--plot", default=None,
                     help="PNG of TTFT/ITL CDFs and latency over time (default: beside a saved "
                          "result).")
    out.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    serve.set_defaults(handler=_serve_command, parser=serve)


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare", help="Compare benchmark or simulation result files side by side.",
        description="A markdown table of the main metrics of result JSON files, with ratios "
                    "to a baseline (>1 = better), and optionally a bar chart.")
    compare.add_argument("results", nargs="+", metavar="RESULT.json")
    compare.add_argument("--baseline", default=None,
                         help="Label or 0-based index of the baseline (default: the first).")
    compare.add_argument("--out-plot", default=None, help="Write a ratio bar chart PNG here.")
    compare.add_argument("--out-md", default=None, help="Also write the table to this file.")
    compare.set_defaults(handler=_compare_command, parser=compare)


def _serve_command(args: argparse.Namespace) -> int:
    from csps.bench.serve import run_serve

    try:
        return run_serve(args)
    except ValueError as exc:
        args.parser.error(str(exc))  # exits with status 2
    except (OSError, RuntimeError) as exc:
        print(f"csps bench serve: error: {exc}", file=sys.stderr)
    return 1


def _compare_command(args: argparse.Namespace) -> int:
    from csps.bench.compare import compare_files
    from csps.bench.plots import has_matplotlib

    out_plot = args.out_plot
    if out_plot and not has_matplotlib():
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        out_plot = None
    try:
        print(compare_files(args.results, args.baseline, out_plot, args.out_md))
    except (OSError, ValueError) as exc:
        args.parser.error(str(exc))
    if out_plot:
        print(f"plot: {out_plot}")
    return 0
