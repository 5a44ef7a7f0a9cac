"""The engine with real SP worker processes on the real model (SmolLM2-135M, 9 / 3 heads).

A ~2k-token prompt prefilled over P = 2 and 3 ranks (uneven head split: Ulysses by KV group)
and a short one prefilled locally, then 24 greedy decode steps each, the long one's KV spread
over the group (q-move decode): tokens identical to the single-worker engine. Each rank's KV pool
is smaller than the long request (1280 tokens per rank): the group holds it. Also checks that
the traffic is counted per phase, and that no KV block stays allocated afterwards.
"""

from __future__ import annotations

import random

import pytest

from csps import LLM, SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 25  # the prefill's token, then 24 decode steps
BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads, head_dim 64, fp32
POOL_BLOCKS = 80  # per SP rank: 1280 tokens, less than the long prompt
WORDS = ("river", "stone", "market", "winter", "lantern", "harbor", "orchard", "violin",
         "copper", "meadow", "engine", "garden", "paper", "island", "thunder", "silver")


def _long_text(num_sentences: int) -> str:
    rng = random.Random(0)
    return " ".join(f"Record {i}: the {rng.choice(WORDS)} near the {rng.choice(WORDS)} was "
                    f"{rng.randint(1, 999)} steps from the {rng.choice(WORDS)}."
                    for i in range(num_sentences))


@pytest.fixture(scope="module")
def prompts(real_model_dir):
    return [_long_text(110) + "\nQuestion: how far was record 3?", "The capital of France is"]


@pytest.fixture(scope="module")
def reference(real_model_dir, prompts):
    llm = LLM(str(real_model_dir), max_model_len=4096, kv_cache_memory_bytes=1 << 28)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                   ignore_eos=True))
    return [o.prompt_token_ids for o in outputs], [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("sp_size", [2, 3])
def test_sp_prefill_and_qmove_decode_match_one_worker(real_model_dir, prompts, reference,
                                                      sp_size):
    prompt_ids, want = reference
    assert 1800 < len(prompt_ids[0]) < 2600 and len(prompt_ids[1]) < 16
    llm = LLM(str(real_model_dir), sequence_parallel_size=sp_size, max_model_len=2400,
              kv_cache_memory_bytes=POOL_BLOCKS * 16 * BYTES_PER_TOKEN,
              long_prompt_threshold=1024)
    engine = llm.llm_engine
    assert engine.get_stats()["num_total_blocks"] == POOL_BLOCKS * sp_size
    assert len(prompt_ids[0]) > POOL_BLOCKS * 16
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, prompt_ids[i], params)
        got, traffic = {}, {}
        while engine.has_unfinished_requests():
            outputs, stats = engine.step()
            for phase, num_bytes in stats.comm_bytes.items():
                traffic[phase] = traffic.get(phase, 0) + num_bytes
            for out in outputs:
                got[out.request_id] = list(out.outputs[0].token_ids)  # cumulative
        assert [got["r0"], got["r1"]] == want
        assert traffic["prefill_attn"] > 0 and traffic["decode_attn"] > 0
        # q-move: a decode step's bytes do not grow with the context; prefill's are ~N-sized
        assert traffic["decode_attn"] < traffic["prefill_attn"]
        engine.scheduler.check_invariants()
        assert engine.get_stats()["kv_cache_usage"] == 0.0
    finally:
        engine.shutdown()
