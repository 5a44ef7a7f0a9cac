"""Simulated prompt ids (simulator/prompt_tokens.py): shared exactly where the Mooncake hash ids
agree, unique per request elsewhere, within 32 bits; and the simulator sends them."""

from __future__ import annotations

import pytest

from csps.bench.traces import TraceRecord, scale_records
from csps.simulator.prompt_tokens import TOKEN_ID_RANGE, hash_block_tokens, prompt_token_ids


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("ids_a,len_a,ids_b,len_b,shared", [
    ((0, 1, 2), 30, (0, 1, 2), 30, 30),  # same ids, same length: the whole prompt
    ((0, 1, 2), 30, (0, 1, 3), 30, 20),  # agree on 2 ids of 10 tokens
    ((0, 1, 2), 25, (0, 1, 2, 4), 40, 25),  # a's last block partial: all of a is in b
    ((0, 1), 20, (0, 1), 35, 20),  # b runs past its ids: its own tokens after
    ((5, 1), 20, (0, 1), 20, 0),  # same second id after a different first: nothing
    ((), 20, (), 20, 0),  # no hash ids (random workloads, Azure): nothing
    ((0, 1, 2), 12, (0, 1, 2), 30, 12),  # a clipped inside its second block
])
def test_prompts_share_exactly_their_agreeing_hash_blocks(ids_a, len_a, ids_b, len_b, shared):
    a = prompt_token_ids(0, len_a, ids_a, block_tokens=10)
    b = prompt_token_ids(1, len_b, ids_b, block_tokens=10)
    assert (len(a), len(b)) == (len_a, len_b)
    assert common_prefix(a, b) == shared


def test_hashed_ids_are_a_function_of_the_hash_and_offset_and_the_rest_are_negative():
    ids = prompt_token_ids(3, 25, (7, 2), block_tokens=10)
    assert ids[:10] == list(range(70, 80)) and ids[10:20] == list(range(20, 30))
    assert all(t < 0 for t in ids[20:]) and len(set(ids[20:])) == 5
    assert prompt_token_ids(3, 25, (7, 2), 10) == ids  # deterministic


def test_unique_ids_differ_between_requests_at_every_position_and_fit_32_bits():
    big = [prompt_token_ids(i, 64, (), 512) for i in (0, 1, 2, 40_000, 2**31 - 2)]
    for pos in range(64):
        assert len({p[pos] for p in big}) == len(big)
    huge = prompt_token_ids(7, 600, (2**40,), 512)  # a hash id far past Mooncake's
    assert all(-TOKEN_ID_RANGE <= t < TOKEN_ID_RANGE for p in big + [huge] for t in p)


def test_hash_block_tokens_follows_the_length_scale_as_the_trace_lengths_do():
    assert hash_block_tokens() == 512 and hash_block_tokens(0.25) == 128
    assert hash_block_tokens(0.001) == 1
    (scaled,) = scale_records([TraceRecord(0.0, 1024, 1, (0, 1))], length_scale=0.25)
    assert scaled.input_len == 2 * hash_block_tokens(0.25)  # two whole blocks stay two
    with pytest.raises(ValueError):
        hash_block_tokens(0)
    with pytest.raises(ValueError):
        prompt_token_ids(0, 10, (1,), block_tokens=0)


def test_the_simulator_sends_each_request_its_built_prompt():
    from csps.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from csps.costmodel.models import model_shape
    from csps.simulator.cluster import build_schedulers, plan_memory
    from csps.simulator.loop import RequestRecord, Simulator
    from csps.simulator.timer import ConstantTimer

    config = EngineConfig(model=ModelConfig(max_model_len=256), cache=CacheConfig(block_size=16),
                          scheduler=SchedulerConfig(policy="sarathi", max_num_batched_tokens=64))
    shape = model_shape("llama-2-7b")
    plan = plan_memory(config, shape, 64 * 16 * shape.kv_bytes_per_token, 4096)
    (scheduler,) = build_schedulers(config, plan)
    sent = {}
    add_request = scheduler.add_request

    def recording_add_request(request):
        sent[request.request_id] = list(request.prompt_token_ids)
        return add_request(request)

    scheduler.add_request = recording_add_request
    simulator = Simulator([scheduler], ConstantTimer(0.01), hash_block_tokens=32)
    simulator.run([RequestRecord("a", 40, 2, 0.0, hash_ids=(0, 1)),
                   RequestRecord("b", 50, 2, 0.5, hash_ids=(0, 2)),
                   RequestRecord("c", 40, 2, 1.0)])
    assert sent["a"] == prompt_token_ids(0, 40, (0, 1), 32)
    assert sent["b"] == prompt_token_ids(1, 50, (0, 2), 32)
    assert sent["c"] == prompt_token_ids(2, 40, (), 32)
    assert common_prefix(sent["a"], sent["b"]) == 32 and common_prefix(sent["a"], sent["c"]) == 0
    with pytest.raises(ValueError):
        Simulator([scheduler], ConstantTimer(0.01), hash_block_tokens=0)
