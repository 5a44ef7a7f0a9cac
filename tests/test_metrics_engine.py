"""The engine's request and preemption counters as /metrics exports them, on the tiny model: a
client that stops listening counts as finished_reason="abort", a request whose own work failed
and the requests of a dead engine as "error" (vLLM counts every finished request by its
reason), and each preemption a tiny KV cache forces adds one to num_preemptions_total and one
log line naming the request."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest

from csps.config import engine_config_from_kwargs
from csps.engine.async_engine import AsyncLLMEngine
from csps.engine.llm_engine import LLMEngine
from csps.engine.outputs import IterationStats
from csps.request import SamplingParams
from csps.server.metrics import PrometheusStatLogger
from tests.test_executor import save_byte_tokenizer

PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 5, 9, 200, 31] * 4, [1, 100, 3, 4]]
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_dir(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_engine")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    save_byte_tokenizer(folder)
    return folder


def make_engine(engine_dir: Path, **kwargs) -> tuple[LLMEngine, PrometheusStatLogger]:
    kwargs = {"max_model_len": 512, "kv_cache_memory_bytes": 1 << 22, **kwargs}
    engine = LLMEngine(engine_config_from_kwargs(model=str(engine_dir), **kwargs))
    return engine, PrometheusStatLogger(engine.model_name, max_model_len=engine.max_model_len)


def sample(stat_logger: PrometheusStatLogger, name: str, **labels: str) -> float:
    value = stat_logger.registry.get_sample_value(
        f"csps:{name}", {"model_name": stat_logger.model_name, **labels})
    assert value is not None, f"csps:{name}{labels} is not exported"
    return value


def successes(stat_logger: PrometheusStatLogger) -> dict[str, float]:
    return {reason: sample(stat_logger, "request_success_total", finished_reason=reason)
            for reason in ("stop", "length", "abort", "error")}


def run_to_end(engine: LLMEngine, stat_logger: PrometheusStatLogger) -> dict[str, str]:
    reasons = {}
    while engine.has_unfinished_requests():
        outputs, stats = engine.step()
        stat_logger.log(stats)
        reasons.update({o.request_id: o.outputs[0].finish_reason for o in outputs if o.finished})
    return reasons


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    assert predicate()


def test_client_that_stops_listening_counts_as_abort(engine_dir):
    engine, stat_logger = make_engine(engine_dir)
    async_engine = AsyncLLMEngine(engine)
    async_engine.add_stat_logger(stat_logger.log)

    async def scenario() -> None:
        stream = async_engine.generate(None, PROMPTS[0], LONG, "leaves")
        async for output in stream:
            if len(output.outputs[0].token_ids) == 3:
                break
        await stream.aclose()  # what the server does when the client hangs up
        await wait_until(lambda: successes(stat_logger)["abort"] == 1)
        await async_engine.shutdown()

    asyncio.run(scenario())
    assert successes(stat_logger) == {"stop": 0, "length": 0, "abort": 1, "error": 0}
    assert sample(stat_logger, "e2e_request_latency_seconds_count") == 1
    assert sample(stat_logger, "request_generation_tokens_sum") >= 3
    assert sample(stat_logger, "kv_cache_usage_perc") == 0 and not engine.has_unfinished_requests()


def test_abort_while_waiting_books_no_made_up_phases(engine_dir):
    engine, stat_logger = make_engine(engine_dir)
    engine.add_request("queued", None, PROMPTS[0], LONG)
    stats = IterationStats()
    [output] = engine.abort_requests(["queued", "unknown"], stats)
    stat_logger.log(stats)
    assert output.finished and output.outputs[0].finish_reason == "abort"
    assert successes(stat_logger)["abort"] == 1
    assert sample(stat_logger, "e2e_request_latency_seconds_count") == 1
    for never_reached in ("request_queue_time_seconds", "request_prefill_time_seconds",
                          "request_decode_time_seconds", "iteration_tokens_total"):
        assert sample(stat_logger, never_reached + "_count") == 0, never_reached
    engine.shutdown()


def test_request_whose_sampling_fails_counts_as_error(engine_dir, monkeypatch):
    engine, stat_logger = make_engine(engine_dir)
    sampler = engine.executor.worker.runner.sampler
    real = sampler._sample_row

    def faulty(row_logits, request_id, params):
        if request_id == "bad":
            raise RuntimeError("injected sampler fault")
        return real(row_logits, request_id, params)
    monkeypatch.setattr(sampler, "_sample_row", faulty)
    engine.add_request("bad", None, PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=8))
    engine.add_request("good", None, PROMPTS[1], SamplingParams(temperature=0, max_tokens=8))
    assert run_to_end(engine, stat_logger) == {"bad": "error", "good": "length"}
    assert successes(stat_logger) == {"stop": 0, "length": 1, "abort": 0, "error": 1}
    engine.shutdown()


def test_requests_of_a_dead_engine_count_as_error(engine_dir, monkeypatch):
    engine, stat_logger = make_engine(engine_dir)
    async_engine = AsyncLLMEngine(engine)
    async_engine.add_stat_logger(stat_logger.log)
    real_step, calls = engine.step, {"n": 0}

    def dying_step():
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected engine fault")
        return real_step()
    monkeypatch.setattr(engine, "step", dying_step)

    async def consume(request_id: str, prompt: list[int]) -> str | None:
        async for output in async_engine.generate(None, prompt, LONG, request_id):
            if output.finished:
                return output.outputs[0].finish_reason
        return None

    async def scenario() -> list:
        reasons = await asyncio.gather(consume("a", PROMPTS[0]), consume("b", PROMPTS[1]))
        await wait_until(lambda: successes(stat_logger)["error"] == 2)  # logged after publishing
        return reasons

    assert asyncio.run(scenario()) == ["error", "error"]
    assert not async_engine.is_healthy
    assert successes(stat_logger) == {"stop": 0, "length": 0, "abort": 0, "error": 2}
    engine.shutdown()


def test_forced_preemptions_are_counted_and_logged(engine_dir, caplog):
    # 6 blocks of 16 tokens; the three requests need 3 + 4 + 3 blocks at their longest
    engine, stat_logger = make_engine(engine_dir, max_model_len=64, block_size=16,
                                      kv_cache_memory_bytes=6 * 16 * 512,
                                      max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), None, prompt, params)
    with caplog.at_level(logging.INFO, logger="csps.scheduler.scheduler"):
        assert run_to_end(engine, stat_logger) == {"0": "length", "1": "length", "2": "length"}
    preemptions = engine.scheduler.num_preemptions
    assert preemptions > 0
    assert sample(stat_logger, "num_preemptions_total") == preemptions
    lines = [r.getMessage() for r in caplog.records if "preempted" in r.getMessage()]
    assert len(lines) == preemptions
    assert all(line.startswith(("request 0 ", "request 1 ", "request 2 ")) for line in lines)
    assert successes(stat_logger)["length"] == 3
    engine.shutdown()
