"""Logprobs on the real weights against transformers' log-softmax (fp32, within 1e-3): the
sampled tokens' (greedy) and the prompt tokens', on one worker and under SP over 2 workers
(the prompt's logprobs then come from both ranks' chunks; n, penalties and a grammar there
too); n independent samples; penalties and min_tokens through the engine."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from csps import LLM, SamplingParams
from csps.model.tokenizer import Tokenizer
from csps.request import StructuredOutputsParams
from tests.test_engine import assert_no_leak

ATOL = 1e-3
MAX_TOKENS = 6
TOP = 3


@pytest.fixture(scope="module")
def prompt_ids(real_model_dir) -> list[int]:
    text = "The history of the printing press begins in the fifteenth century, when " * 12
    return Tokenizer(real_model_dir).encode(text)[:150]


@pytest.fixture(scope="module")
def hf_logprobs(real_model_dir, prompt_ids) -> torch.Tensor:
    """[L + MAX_TOKENS, V]: the log-softmax after each position of the greedy continuation."""
    model = HFLlamaForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        return model(ids).logits[0].log_softmax(-1), ids[0].tolist()


def _check(output, prompt_ids, hf) -> None:
    logprobs, ids = hf
    completion = output.outputs[0]
    assert completion.token_ids == ids[len(prompt_ids):]
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs,
                                           strict=True)):
        want = logprobs[len(prompt_ids) - 1 + i]
        assert entry[token].rank == 1  # greedy
        assert entry[token].logprob == pytest.approx(float(want[token]), abs=ATOL)
        top = want.topk(TOP)
        assert list(entry)[:1] == [token] and len(entry) == TOP
        for t, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert entry[t].logprob == pytest.approx(lp, abs=ATOL)
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs,
                                         strict=True)), abs=1e-6)
    prompt = output.prompt_logprobs
    assert len(prompt) == len(prompt_ids) and prompt[0] is None
    for pos in range(1, len(prompt_ids)):
        token = prompt_ids[pos]
        assert prompt[pos][token].logprob == pytest.approx(float(logprobs[pos - 1, token]),
                                                           abs=ATOL)
        assert prompt[pos][token].rank == int((logprobs[pos - 1] > logprobs[pos - 1, token])
                                              .sum()) + 1


PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP,
                        prompt_logprobs=1)


def test_logprobs_equal_transformers_one_worker(real_model_dir, prompt_ids, hf_logprobs):
    llm = LLM(str(real_model_dir), max_model_len=512, kv_cache_memory_bytes=1 << 26,
              scheduler="sarathi", max_num_batched_tokens=64)  # prompt in 3 chunks
    _check(llm.generate([prompt_ids], PARAMS)[0], prompt_ids, hf_logprobs)
    # again: its blocks are cached now, but prompt logprobs need every position computed
    again = llm.generate([prompt_ids], PARAMS)[0]
    assert again.num_cached_tokens == 0
    _check(again, prompt_ids, hf_logprobs)
    plain = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=1))[0]
    assert plain.num_cached_tokens == (len(prompt_ids) - 1) // 16 * 16  # others still hit
    assert_no_leak(llm)


def test_logprobs_equal_transformers_under_sp(real_model_dir, prompt_ids, hf_logprobs):
    llm = LLM(str(real_model_dir), sequence_parallel_size=2, max_model_len=512,
              kv_cache_memory_bytes=1 << 26, long_prompt_threshold=64)
    try:
        _check(llm.generate([prompt_ids], PARAMS)[0], prompt_ids, hf_logprobs)
        # the rest of the surface under SP: n, penalties and a grammar, sampled on the leader
        schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                         "maximum": 999}},
                  "required": ["a"], "additionalProperties": False}
        grammar = StructuredOutputsParams(json=json.dumps(schema))
        out = llm.generate([prompt_ids], SamplingParams(
            n=2, temperature=1.0, seed=2, max_tokens=64, presence_penalty=0.5,
            structured_outputs=grammar))[0]
        for completion in out.outputs:
            assert completion.finish_reason == "stop"
            assert isinstance(json.loads(completion.text)["a"], int)
    finally:
        llm.llm_engine.shutdown()


def test_n_samples_penalties_and_min_tokens(real_model_dir, prompt_ids):
    llm = LLM(str(real_model_dir), max_model_len=512, kv_cache_memory_bytes=1 << 26)
    out = llm.generate([prompt_ids], SamplingParams(n=4, temperature=1.0, seed=3,
                                                    max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples
    again = llm.generate([prompt_ids], SamplingParams(n=4, temperature=1.0, seed=3,
                                                      max_tokens=8, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=16,
                                                       ignore_eos=True))[0].outputs[0]
    penalised = llm.generate([prompt_ids], SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=2.0,
        presence_penalty=2.0))[0].outputs[0]
    assert len(set(penalised.token_ids)) > len(set(greedy.token_ids))  # repeats less
    eos = llm.get_tokenizer().eos_token_id
    banned = llm.generate([prompt_ids], SamplingParams(
        temperature=0, max_tokens=4, logit_bias={eos: 100.0}, min_tokens=3))[0].outputs[0]
    assert len(banned.token_ids) == 4 and banned.token_ids[3] == eos  # EOS held off 3 tokens
    assert_no_leak(llm)
