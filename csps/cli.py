"""The `csps` command: `csps serve MODEL [flags]` starts the OpenAI-compatible server.

Engine flags are generated from the fields of the frozen config dataclasses (csps/config.py),
with each field's `metadata["help"]`, in kebab-case, so the config stays the one source of
truth. Names follow vLLM where the meaning is the same. More subcommands (bench, simulate) plug
in beside `serve` through `build_parser()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import types
import typing

from csps.config import (
    CSA_FAR_QUERIES,
    DTYPES,
    SCHEDULER_POLICIES,
    SP_ATTENTION_ALGORITHMS,
    SP_DECODE_MODES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ObservabilityConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_bytes,
)

logger = logging.getLogger("csps.serve")

# EngineConfig field -> the config class that fills it.
CONFIG_GROUPS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                 "parallel": ParallelConfig, "observability": ObservabilityConfig}
# Fields whose flag is not simply `--field-name`.
FLAG_NAMES = {
    "policy": ("--scheduler",),
    "tensor_parallel_size": ("--tensor-parallel-size", "-tp"),
    "sequence_parallel_size": ("--sequence-parallel-size", "-sp"),
    "sp_attention": ("--sp-attention", "--sparse-attention"),  # `--sparse-attention csa`
}
CHOICES = {"policy": SCHEDULER_POLICIES, "dtype": DTYPES, "device": ("auto", "cpu", "cuda"),
           "sp_attention": SP_ATTENTION_ALGORITHMS, "sp_decode": SP_DECODE_MODES,
           "csa_far_queries": CSA_FAR_QUERIES}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _byte_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        message = f"{exc} (use e.g. 512M, 2G or a number of bytes)"
        raise argparse.ArgumentTypeError(message) from None


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0-65535, got {port}")
    return port


def _flag_type(field_type: object):
    """The argparse `type` for a resolved field annotation such as `int | None`."""
    if isinstance(field_type, types.UnionType) or typing.get_origin(field_type) is typing.Union:
        field_type = next(t for t in typing.get_args(field_type) if t is not type(None))
    return field_type


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (the model is positional), grouped by config class."""
    for group_name, config_cls in CONFIG_GROUPS.items():
        group = parser.add_argument_group(f"{group_name} options")
        hints = typing.get_type_hints(config_cls)
        for field in dataclasses.fields(config_cls):
            help_text = field.metadata.get("help", "")
            if "default" not in help_text:
                help_text += " (default: %(default)s)"
            kwargs: dict = {"default": field.default, "help": help_text}
            if field.name == "model":
                group.add_argument("model", nargs="?", metavar="MODEL", **kwargs)
                continue
            kwargs["dest"] = field.name
            field_type = _flag_type(hints[field.name])
            if field.name == "kv_cache_memory_bytes":
                kwargs["type"] = _byte_size
            elif field_type is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = field_type
            if field.name in CHOICES:
                kwargs["choices"] = CHOICES[field.name]
            names = FLAG_NAMES.get(field.name, (_flag_name(field.name),))
            group.add_argument(*names, **kwargs)


def _flag_name(field_name: str) -> str:
    return FLAG_NAMES.get(field_name, ("--" + field_name.replace("_", "-"),))[0]


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the EngineConfig. The configs' own checks raise ValueError, reworded here to name
    flags rather than fields."""
    try:
        groups = {
            group_name: config_cls(**{f.name: getattr(args, f.name)
                                      for f in dataclasses.fields(config_cls)})
            for group_name, config_cls in CONFIG_GROUPS.items()
        }
    except ValueError as exc:
        message = str(exc)
        for config_cls in CONFIG_GROUPS.values():
            for field in dataclasses.fields(config_cls):
                if field.name != "model":
                    message = re.sub(rf"\b{field.name}\b", _flag_name(field.name), message)
        raise ValueError(message) from None
    return EngineConfig(**groups)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve a model over an OpenAI-compatible HTTP API (vLLM's flag names).")
    add_engine_args(serve)
    server = serve.add_argument_group("server options")
    server.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default: %(default)s).")
    server.add_argument("--port", type=_port, default=8000,
                        help="Port to listen on (default: %(default)s).")
    server.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer KEY' on /v1 and tokenize routes.")
    server.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="Log level (default: %(default)s).")
    serve.set_defaults(handler=serve_command, parser=serve)


def serve_command(args: argparse.Namespace) -> int:
    """Build the config, load the engine, and run uvicorn until interrupted."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        args.parser.error(str(exc))  # exits with status 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn  # the engine and server are heavy: import them only to serve

    from csps.engine import torchrun_executor as torchrun
    from csps.engine.async_engine import AsyncLLMEngine
    from csps.server.api import create_app

    try:
        if torchrun.launched_by_torchrun() and torchrun.torchrun_rank() != 0:
            return torchrun.run_torchrun_worker(config)  # rank 0 holds the engine and the server
        engine = AsyncLLMEngine.from_config(config)
    except ValueError as exc:
        print(f"csps serve: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(engine, api_key=args.api_key)
    logger.info("Serving %s on http://%s:%d (OpenAI API under /v1)",
                config.model.name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csps", description="csps: an LLM serving engine.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(subparsers)
    from csps.bench.cli import add_bench_parser
    add_bench_parser(subparsers)
    from csps.simulator.cli import add_simulate_parser
    add_simulate_parser(subparsers)
    from csps.costmodel.profile_cli import add_profile_parser
    add_profile_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (`csps`)."""
    args = build_parser().parse_args(argv)
    return args.handler(args)
