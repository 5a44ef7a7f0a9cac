"""`csps serve` flags: generated from the config dataclasses, named as vLLM names them, and
rejected with a clear one-line error when bad."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest
from fake_engine import FakeEngine  # tests/ has no __init__.py: pytest puts it on sys.path

from csps import cli
from csps.config import EngineConfig


def parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_vllm_flag_names_fill_the_config():
    args = parse("my-model", "--max-model-len", "4096", "--max-num-batched-tokens", "1024",
                 "--max-num-seqs", "8", "--served-model-name", "served", "--dtype", "float32",
                 "--seed", "3", "-tp", "2", "-sp", "4", "--scheduler", "sps2",
                 "--kv-cache-memory-bytes", "512M", "--block-size", "32",
                 "--max-waiting-requests", "10", "--device", "cpu",
                 "--long-prompt-threshold", "2048", "--sp-attention", "ring")
    config = cli.config_from_args(args)
    assert (config.model.model, config.model.served_model_name, config.model.name) == (
        "my-model", "served", "served")
    assert (config.model.max_model_len, config.model.dtype, config.model.seed) == (4096,
                                                                                   "float32", 3)
    assert config.model.device == "cpu"
    assert (config.scheduler.policy, config.scheduler.max_num_batched_tokens) == ("sps2", 1024)
    assert (config.scheduler.long_prompt_threshold, config.parallel.sp_attention) == (2048, "ring")
    assert (config.scheduler.max_num_seqs, config.scheduler.max_waiting_requests) == (8, 10)
    assert (config.cache.kv_cache_memory_bytes, config.cache.block_size) == (512 << 20, 32)
    assert (config.parallel.tensor_parallel_size, config.parallel.sequence_parallel_size) == (2, 4)


def test_a_single_worker_policy_on_an_sp_group_is_refused():
    with pytest.raises(ValueError, match="sps2"):
        cli.config_from_args(parse("-sp", "2", "--scheduler", "sarathi"))


def test_long_parallel_flags_and_defaults():
    args = parse("--tensor-parallel-size", "2", "--sequence-parallel-size", "3")
    config = cli.config_from_args(args)
    assert config.parallel == type(config.parallel)(sequence_parallel_size=3,
                                                    tensor_parallel_size=2)
    defaults = EngineConfig()
    assert config.model == defaults.model and config.cache == defaults.cache
    assert config.scheduler.policy == "sps2"  # "auto" on several SP ranks
    assert defaults.scheduler.policy == "sarathi"  # "auto" on one
    assert (args.host, args.port, args.api_key, args.log_level) == ("127.0.0.1", 8000, None,
                                                                   "info")


def test_every_config_field_has_a_flag_with_its_help():
    parser = next(a for a in cli.build_parser()._actions
                  if isinstance(a, cli.argparse._SubParsersAction)).choices["serve"]
    actions = {action.dest: action for action in parser._actions}
    for config_cls in cli.CONFIG_GROUPS.values():
        for field in dataclasses.fields(config_cls):
            assert field.name in actions, field.name
            assert actions[field.name].help.startswith(field.metadata["help"])


@pytest.mark.parametrize("argv,message", [
    (["--kv-cache-memory-bytes", "2X"], "not a byte size"),
    (["--scheduler", "fifo"], "invalid choice"),
    (["--dtype", "int3"], "invalid choice"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be positive"),
    (["--block-size", "-1"], "--block-size must be positive"),
    (["--max-model-len", "many"], "invalid int value"),
    (["--port", "70000"], "port must be in 0-65535"),
    (["-tp", "0"], "parallel sizes must be positive"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_values_exit_2_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("csps serve: error:", "csps: error:"))


def fake_engine_module(monkeypatch, from_config) -> None:
    """Stand in for csps.engine.async_engine, which `serve` imports lazily."""
    module = types.ModuleType("csps.engine.async_engine")
    module.AsyncLLMEngine = type("AsyncLLMEngine", (), {"from_config": staticmethod(from_config)})
    monkeypatch.setitem(sys.modules, "csps.engine.async_engine", module)


def test_serve_startup_value_error_exits_2(monkeypatch, capsys):
    def from_config(config):
        raise ValueError("max_model_len 99999 does not fit in the KV cache memory")

    fake_engine_module(monkeypatch, from_config)
    assert cli.main(["serve", "tiny", "--max-model-len", "99999"]) == 2
    err = capsys.readouterr().err
    assert err == "csps serve: error: max_model_len 99999 does not fit in the KV cache memory\n"


def test_serve_builds_the_app_and_runs_uvicorn(monkeypatch):
    import uvicorn

    seen = {}
    fake_engine_module(monkeypatch, lambda config: seen.setdefault(
        "engine", FakeEngine(model_name=config.model.name)))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    assert cli.main(["serve", "tiny", "--served-model-name", "t", "--port", "0",
                     "--host", "0.0.0.0", "--api-key", "k", "--log-level", "warning"]) == 0
    assert seen["engine"].model_name == "t"
    assert (seen["host"], seen["port"], seen["log_level"]) == ("0.0.0.0", 0, "warning")
    assert seen["app"].state.engine is seen["engine"]


def test_python_dash_m_csps_server_help():
    result = subprocess.run([sys.executable, "-m", "csps.server", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--max-model-len", "--max-num-batched-tokens", "--tensor-parallel-size",
                 "--sequence-parallel-size", "--scheduler", "--kv-cache-memory-bytes"):
        assert flag in result.stdout
