"""The engine on the real model: sampling parameters, stop rules, preemption, aborts, and the
books after every request (no KV block stays allocated)."""

from __future__ import annotations

import pytest

from csps import LLM, SamplingParams

PROMPTS = ["The capital of France is", "List the planets of the solar system:",
           "def fibonacci(n):"]


def assert_no_leak(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.scheduler.check_invariants()
    pool = engine.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks and not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def llm(real_model_dir):
    return LLM(str(real_model_dir), max_model_len=1024, kv_cache_memory_bytes=1 << 27)


@pytest.fixture(scope="module")
def greedy(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params)]


def test_outputs_are_vllm_shaped(llm, greedy):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.prompt == PROMPTS[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode(PROMPTS[0])
    assert out.outputs[0].token_ids == greedy[0].token_ids[:3]
    assert out.outputs[0].finish_reason == "length" and out.finished
    assert_no_leak(llm)


def test_top_k_1_is_greedy_and_seeds_repeat(llm, greedy):
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=24,
                                                ignore_eos=True))
    assert [o.outputs[0].token_ids for o in top1] == [g.token_ids for g in greedy]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=16, ignore_eos=True)
    first = llm.generate(PROMPTS, seeded)
    second = llm.generate(PROMPTS[::-1], seeded)[::-1]  # other batch order, same seeds
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
    other = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=7, max_tokens=16,
                                                 ignore_eos=True))
    assert [o.outputs[0].token_ids for o in other] != [o.outputs[0].token_ids for o in first]
    assert_no_leak(llm)


def test_stop_string_truncates(llm, greedy):
    text = greedy[1].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {text!r}"
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert out.outputs[0].text == text[:text.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    kept = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                   include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[:text.index(stop) + len(stop)]
    assert_no_leak(llm)


def test_stop_token_ids_and_max_tokens(llm, greedy):
    stop_id = greedy[2].token_ids[4]
    first = greedy[2].token_ids.index(stop_id)
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=24,
                                                  stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == greedy[2].token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    short = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert len(short.token_ids) == 5 and short.finish_reason == "length"


def test_eos_stops_unless_ignored(llm):
    chat = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    eos = llm.get_tokenizer().eos_token_id
    out = llm.generate([chat], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop" and out.token_ids[-1] == eos
    forced = llm.generate([chat], SamplingParams(temperature=0, max_tokens=40,
                                                 ignore_eos=True))[0].outputs[0]
    assert len(forced.token_ids) == 40 and forced.finish_reason == "length"
    assert_no_leak(llm)


def test_preemption_keeps_greedy_outputs(real_model_dir, greedy):
    """A pool too small for all three requests at once forces preemption by recompute."""
    small = LLM(str(real_model_dir), max_model_len=64, block_size=16,
                kv_cache_memory_bytes=5 * 16 * 46080, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = small.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outputs] == [g.token_ids for g in greedy]
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert_no_leak(small)


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    tokens = llm.get_tokenizer().encode(PROMPTS[1])
    engine.add_request("x", None, tokens, SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("y", None, tokens, SamplingParams(temperature=0, max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.kv_cache_manager.usage > 0
    outputs = engine.abort_requests(["x", "y"])
    assert [o.outputs[0].finish_reason for o in outputs] == ["abort", "abort"]
    assert_no_leak(llm)


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty"),
    ([10**6], SamplingParams(), "Token ids"),
    ([5] * 1024, SamplingParams(), "maximum context length"),
    ([5] * 1000, SamplingParams(max_tokens=100), "maximum context length"),
])
def test_bad_requests_raise_value_error(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.llm_engine.add_request("bad", None, prompt, params)
    assert_no_leak(llm)


def test_max_model_len_that_does_not_fit_fails_at_start(real_model_dir):
    with pytest.raises(ValueError, match="Lower --max-model-len to at most 1024"):
        LLM(str(real_model_dir), max_model_len=4096, kv_cache_memory_bytes=64 * 16 * 46080)


def test_bfloat16_engine_generates(real_model_dir):
    llm = LLM(str(real_model_dir), dtype="bfloat16", max_model_len=256,
              kv_cache_memory_bytes=1 << 26)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert "Paris" in out.text
    assert_no_leak(llm)
