"""A fault in one request's own work (its sampling, its detokenizing) ends that request alone:
it finishes with an error and frees its KV, and the rest of its batch completes unchanged."""

from __future__ import annotations

import pytest

from csps import LLM, SamplingParams
from csps.engine.output_processor import RequestState
from tests.test_engine import assert_no_leak

PROMPTS = [f"Story number {i}: once upon a time" for i in range(8)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
FAULTY = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(real_model_dir):
    return LLM(str(real_model_dir), max_model_len=1024, kv_cache_memory_bytes=1 << 27)


@pytest.fixture(scope="module")
def clean(llm):
    return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY)]


def _check_batch(llm, clean, outputs, bad: int) -> None:
    for i, out in enumerate(outputs):
        if i == bad:
            assert out.outputs[0].finish_reason == "error" and out.finished
            assert "injected" in out.error
        else:
            assert out.error is None and out.outputs[0].finish_reason == "length"
            assert out.outputs[0].text == clean[i]  # the other seven: unchanged greedy text
    assert_no_leak(llm)


def test_sampling_fault_ends_one_request_of_eight(llm, clean, monkeypatch):
    sampler = llm.llm_engine.executor.worker.runner.sampler
    real = sampler._sample_row
    calls = {"n": 0}

    def faulty(row_logits, request):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-decode, with KV allocated
            raise RuntimeError("injected sampler fault")
        return real(row_logits, request)
    monkeypatch.setattr(sampler, "_sample_row", faulty)
    params = [FAULTY if i == 3 else GREEDY for i in range(8)]
    _check_batch(llm, clean, llm.generate(PROMPTS, params), bad=3)
    # the engine goes on serving afterwards
    assert [o.outputs[0].text for o in llm.generate(PROMPTS[:2], GREEDY)] == clean[:2]


def test_detokenizer_fault_ends_one_request_of_eight(llm, clean, monkeypatch):
    real = RequestState.append
    bad_prompt = PROMPTS[5]

    def faulty(self, token_id):
        if self.prompt == bad_prompt and len(self.token_ids) >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, token_id)
    monkeypatch.setattr(RequestState, "append", faulty)
    _check_batch(llm, clean, llm.generate(PROMPTS, GREEDY), bad=5)
