"""Acceptance: on the real SmolLM2 weights, csps's greedy generation equals Hugging Face
transformers' LlamaForCausalLM token for token, under both scheduler policies and with chunk
budgets 64 and 512, on three prompts (one over 1,500 tokens); last-position logits of the long
prompt, prefilled in 64-token chunks through the paged cache, are within 1e-3 (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from csps import LLM, SamplingParams
from csps.attention import AttentionMetadata
from csps.kvcache.paged_cache import allocate_kv_caches
from csps.model.tokenizer import Tokenizer

NUM_NEW_TOKENS = 12
LOGITS_ATOL = 1e-3
CONFIGS = [dict(scheduler="vllm"), dict(scheduler="sarathi", max_num_batched_tokens=64),
           dict(scheduler="sarathi", max_num_batched_tokens=512)]


@pytest.fixture(scope="module")
def hf_model(real_model_dir):
    return HFLlamaForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(real_model_dir) -> list[list[int]]:
    """A chat prompt, a short plain prompt and a 1,600-token document (this repo's own docs)."""
    tokenizer = Tokenizer(real_model_dir)
    root = Path(__file__).resolve().parents[1]
    text = "\n\n".join((root / p).read_text() for p in ("docs/architecture.md", "README.md"))
    long_ids = tokenizer.encode(text)[:1600]
    assert len(long_ids) == 1600, "the docs are too short to make a 1,600-token prompt"
    return [tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}]),
            tokenizer.encode("The three laws of thermodynamics are"),
            long_ids + tokenizer.encode("\n\nIn one sentence, csps is")]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts) -> list[list[int]]:
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            generated = hf_model.generate(torch.tensor([ids]), max_new_tokens=NUM_NEW_TOKENS,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)
            outputs.append(generated[0, len(ids):].tolist())
    return outputs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_greedy_tokens_equal_hf(real_model_dir, prompts, hf_greedy, config):
    llm = LLM(str(real_model_dir), max_model_len=2048, kv_cache_memory_bytes=1 << 28, **config)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy
    pool = llm.llm_engine.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks  # nothing leaked


def test_long_prompt_last_logits_match_hf(real_model_dir, hf_model, prompts):
    ids = prompts[2]
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0, -1]  # [V]
    llm = LLM(str(real_model_dir), max_model_len=2048, kv_cache_memory_bytes=1 << 28)
    model = llm.llm_engine.executor.worker.model
    arch = llm.llm_engine.arch
    block_size, chunk = 16, 64
    caches = allocate_kv_caches(arch.num_hidden_layers, -(-len(ids) // block_size), block_size,
                                arch.num_key_value_heads, arch.head_dim, torch.float32, "cpu")
    blocks = list(range(len(caches[0].k_cache)))[::-1]  # any order works
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = ids[start:start + chunk]
            metadata = AttentionMetadata.build([(start, len(piece), blocks)], block_size, "cpu")
            hidden = model(torch.tensor(piece), torch.arange(start, start + len(piece)), caches,
                           metadata)
        logits = model.compute_logits(hidden[-1:])[0]
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)
