"""MultiProcExecutor on the tiny model with 2 spawned workers: tokens equal the single-process
engine's; a worker that raises, stalls or dies (even SIGKILLed mid-request under the async
engine) fails fast with WorkerError, and no worker process outlives its executor."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from csps.config import engine_config_from_kwargs
from csps.contract.step import ScheduledRequest, SchedulerOutput
from csps.engine import multiproc_executor as executor_module
from csps.engine.async_engine import AsyncLLMEngine
from csps.engine.errors import EngineDeadError, WorkerError
from csps.engine.executor import UniProcExecutor
from csps.engine.llm_engine import LLMEngine
from csps.engine.multiproc_executor import MultiProcExecutor
from csps.model.arch_config import LlamaArchConfig
from csps.request import SamplingParams

PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 5, 9, 200, 31] * 7, [1, 100]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def save_byte_tokenizer(folder: Path) -> None:
    """A 256-token byte-level fast tokenizer (ids 1 / 2 are bos / eos), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=alphabet[1],
                            eos_token=alphabet[2]).save_pretrained(folder)


@pytest.fixture(scope="module")
def engine_dir(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_engine")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def worker_kwargs(tiny_model_dir) -> dict:
    arch = LlamaArchConfig.from_hf_dict(json.loads((tiny_model_dir / "config.json").read_text()))
    return dict(model_dir=tiny_model_dir, arch=arch, dtype="float32", device="cpu",
                num_blocks=16, block_size=16, seed=0)


def two_workers(config, worker_kwargs) -> MultiProcExecutor:
    """Replicated workers: each rank runs the whole batch; rank 0's tokens come back."""
    return MultiProcExecutor(worker_kwargs, sp_size=2, tp_size=1)


def make_engine(engine_dir: Path, factory=two_workers) -> LLMEngine:
    config = engine_config_from_kwargs(model=str(engine_dir), max_model_len=512,
                                       kv_cache_memory_bytes=1 << 22)
    return LLMEngine(config, executor_factory=factory)


def generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), None, prompt, GREEDY)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step()[0]:
            tokens[output.request_id] = output.outputs[0].token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


def assert_no_workers(executor: MultiProcExecutor) -> None:
    """None of the executor's workers is alive, nor left as a zombie."""
    pids = set(executor.worker_pids)
    assert len(pids) == 2 and not [p for p in mp.active_children() if p.pid in pids]
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def request(token_ids: list[int], block: int = 0) -> SchedulerOutput:
    return SchedulerOutput(0, [ScheduledRequest("r", token_ids, 0, [block],
                                                SamplingParams(temperature=0), True)])


@pytest.fixture(scope="module")
def engine(engine_dir):
    engine = make_engine(engine_dir)
    yield engine
    engine.shutdown()
    assert_no_workers(engine.executor)


def test_two_workers_match_single_process(engine, engine_dir):
    single = make_engine(engine_dir, factory=lambda config, kwargs: UniProcExecutor(**kwargs))
    assert generate(engine, PROMPTS) == generate(single, PROMPTS)
    assert len(set(engine.executor.worker_pids) - {None, os.getpid()}) == 2


def test_unlisted_method_and_oversized_payload_are_refused(engine, monkeypatch):
    with pytest.raises(ValueError, match="not a remotely callable"):
        engine.executor.call("load_weights", [])
    monkeypatch.setattr(executor_module, "MAX_PAYLOAD_BYTES", 1000)
    with pytest.raises(ValueError, match="over the 1000-byte limit"):
        engine.executor.execute_model(request(list(range(1, 250)) * 4))
    engine.executor.check_health()  # refusals send nothing: the workers still serve


def test_shutdown_is_graceful_and_idempotent(worker_kwargs):
    executor = MultiProcExecutor(worker_kwargs, sp_size=2, tp_size=1)
    assert executor.execute_model(request([1, 2, 3])).sampled_token_ids.keys() == {"r"}
    procs = list(executor._procs)
    executor.shutdown()
    executor.shutdown()
    assert [p.exitcode for p in procs] == [0, 0]
    assert_no_workers(executor)
    with pytest.raises(WorkerError, match="shut down"):
        executor.execute_model(request([1, 2, 3]))


@pytest.mark.parametrize("failure", ["raise", "timeout", "idle_death"])
def test_failed_worker_stops_all(worker_kwargs, failure):
    executor = MultiProcExecutor(worker_kwargs, sp_size=2, tp_size=1)
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        if failure == "raise":  # a token id past the vocabulary fails in the embedding
            executor.execute_model(request([1, 10**6]))
        elif failure == "timeout":
            executor.call("execute_model", request(list(range(1, 16))), timeout_s=1e-4)
        else:
            os.kill(executor.worker_pids[1], signal.SIGKILL)
            time.sleep(0.5)
            executor.check_health()
    assert time.monotonic() - start < 10
    expected = {"raise": "rank [01] raised IndexError", "timeout": "did not answer within",
                "idle_death": r"worker rank 1 died \(exit code -9\)"}[failure]
    assert info.match(expected)
    if failure == "raise":
        assert info.value.rank in (0, 1) and "embedding" in info.value.remote_traceback
        assert "IndexError" in str(info.value.__cause__)
    assert_no_workers(executor)
    with pytest.raises(WorkerError, match="workers are stopped"):
        executor.execute_model(request([1, 2, 3]))


@pytest.mark.parametrize("broken,error", [("layers", ValueError), ("weights", WorkerError)])
def test_load_failure_in_a_worker_reaches_the_caller(worker_kwargs, tmp_path, broken, error):
    source = worker_kwargs["model_dir"]
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    if broken == "layers":  # config with 3 layers, weights for 2
        shutil.copy(source / "model.safetensors", tmp_path)
    before = set(mp.active_children())
    with pytest.raises(error, match="lacks|no \\*.safetensors"):
        MultiProcExecutor({**worker_kwargs, "model_dir": tmp_path}, sp_size=2, tp_size=1)
    assert set(mp.active_children()) <= before


def test_worker_killed_mid_request_fails_the_stream(engine_dir):
    async def scenario(engine: AsyncLLMEngine) -> tuple[list, float]:
        params = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)
        outputs, killed_at = [], None
        async for output in engine.generate(None, [1, 2, 3], params, "long"):
            outputs.append(output)
            if len(outputs) == 3:
                os.kill(engine.engine.executor.worker_pids[1], signal.SIGKILL)
                killed_at = time.monotonic()
        return outputs, time.monotonic() - killed_at

    engine = AsyncLLMEngine(make_engine(engine_dir))
    outputs, seconds = asyncio.run(scenario(engine))
    assert seconds < 15 and len(outputs) < 480
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "error"
    assert "worker rank 1 died (exit code -9)" in outputs[-1].error
    assert not engine.is_healthy

    async def new_request() -> None:
        async for _ in engine.generate(None, [1, 2], GREEDY, "next"):
            pass

    with pytest.raises(EngineDeadError, match="rank 1 died"):
        asyncio.run(new_request())
    asyncio.run(engine.shutdown())
    assert_no_workers(engine.engine.executor)
