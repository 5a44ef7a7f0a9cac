"""Paged reference attention vs dense attention; partial-softmax merges; metadata; KV sizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csps.attention import AttentionMetadata, get_attention_backend
from csps.attention.merge import merge_attn_states
from csps.attention.partial import partial_attention
from csps.attention.reference import attention_with_lse
from csps.kvcache.capacity import kv_bytes_per_token, plan_num_blocks
from csps.kvcache.paged_cache import (
    KVCache,
    allocate_kv_caches,
)

ATOL = 1e-5  # float32, same math in a different order
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 16, 4, 64


def dense_attention(q, k, v, num_computed):
    """q [n, Hq, D] at positions c..c+n-1 over k, v [c+n, Hkv, D]: causal, via repeat + SDPA."""
    group = q.shape[1] // k.shape[1]
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(num_computed)
    out = F.scaled_dot_product_attention(q.transpose(0, 1),
                                         k.repeat_interleave(group, 1).transpose(0, 1),
                                         v.repeat_interleave(group, 1).transpose(0, 1),
                                         attn_mask=mask)
    return out.transpose(0, 1)


def run_schedule(schedule, seq_lens, seed=0, consecutive_blocks=False):
    """Feed each request's tokens through the paged backend as `schedule` says.

    schedule: list of steps, each a list of (request, num_new_tokens). Every output row is
    checked against dense attention over that request's full key history.
    """
    gen = torch.Generator().manual_seed(seed)
    qkv = {r: [torch.randn(n, h, HEAD_DIM, generator=gen)
               for h in (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS)] for r, n in enumerate(seq_lens)}
    blocks = (list(range(NUM_BLOCKS)) if consecutive_blocks
              else torch.randperm(NUM_BLOCKS, generator=gen).tolist())
    tables, computed = {}, dict.fromkeys(range(len(seq_lens)), 0)
    for r, n in enumerate(seq_lens):
        tables[r], blocks = blocks[:-(-n // BLOCK_SIZE)], blocks[-(-n // BLOCK_SIZE):]
    cache = allocate_kv_caches(1, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                               torch.float32, "cpu")[0]
    backend = get_attention_backend("reference")
    for step in schedule:
        metadata = AttentionMetadata.build(
            [(computed[r], n, tables[r]) for r, n in step], BLOCK_SIZE, "cpu")
        q, k, v = (torch.cat([qkv[r][i][computed[r]:computed[r] + n] for r, n in step])
                   for i in range(3))
        out = backend.forward(q, k, v, cache, metadata)
        row = 0
        for r, n in step:
            c = computed[r]
            expected = dense_attention(qkv[r][0][c:c + n], qkv[r][1][:c + n], qkv[r][2][:c + n], c)
            torch.testing.assert_close(out[row:row + n], expected, atol=ATOL, rtol=0)
            row += n
            computed[r] += n


@pytest.fixture(params=["one decode group", "groups of two"])
def decode_group_bytes(request, monkeypatch):
    if request.param == "groups of two":  # the smallest groups the backend makes
        monkeypatch.setattr("csps.attention.reference._DECODE_GROUP_BYTES", 1)


@pytest.mark.parametrize("consecutive_blocks", [False, True])
def test_paged_chunked_prefill_and_decode_match_dense(consecutive_blocks, decode_group_bytes):
    with torch.inference_mode():
        # r0 prefills in chunks of 7 then decodes; r1 decodes while r0 prefills; r2 joins late;
        # in step 4 the two decodes sit on either side of a prefill chunk.
        run_schedule([[(0, 7), (1, 5)], [(0, 7), (1, 1)], [(0, 7), (1, 1), (2, 9)],
                      [(1, 1), (0, 2), (2, 1)], [(2, 1), (0, 1), (1, 1)], [(1, 1)]],
                     seq_lens=[24, 10, 11], consecutive_blocks=consecutive_blocks)


def test_pure_decode_batch_with_unequal_lengths(decode_group_bytes):
    with torch.inference_mode():
        run_schedule([[(0, 13), (1, 3), (2, 8), (3, 6)], [(0, 1), (1, 1), (2, 1), (3, 1)],
                      [(2, 1), (0, 1), (3, 1), (1, 1)]], seq_lens=[15, 5, 10, 8])


def test_no_cache_prefill_matches_dense():
    gen = torch.Generator().manual_seed(1)
    lens = [5, 12, 1]
    q = torch.randn(sum(lens), NUM_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(sum(lens), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(sum(lens), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    metadata = AttentionMetadata.build_no_cache(lens, "cpu")
    out = get_attention_backend("reference").forward(q, k, v, None, metadata)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        torch.testing.assert_close(out[s], dense_attention(q[s], k[s], v[s], 0), atol=ATOL, rtol=0)
        start += n


def test_attention_with_lse_matches_sdpa_and_logsumexp():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(6, NUM_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(10, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(10, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    out, lse = attention_with_lse(q, k, v, causal_offset=4)
    torch.testing.assert_close(out, dense_attention(q, k, v, 4), atol=ATOL, rtol=0)
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) * HEAD_DIM ** -0.5
    visible = torch.ones(6, 10, dtype=torch.bool).tril(4)
    expected = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1).T
    torch.testing.assert_close(lse, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_merging_two_halves_equals_full_attention(causal):
    gen = torch.Generator().manual_seed(3)
    num_queries, num_keys = 8, 20
    q = torch.randn(num_queries, NUM_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(num_keys, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(num_keys, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    offset = num_keys - num_queries if causal else None
    full_out, full_lse = attention_with_lse(q, k, v, causal_offset=offset)
    split = 15  # with the causal offset 12, queries 0..2 see no key past the split
    first = attention_with_lse(q, k[:split], v[:split], causal_offset=offset)
    second = attention_with_lse(q, k[split:], v[split:],
                                causal_offset=None if offset is None else offset - split)
    assert torch.isneginf(second[1]).any() == causal
    out, lse = merge_attn_states([first[0], second[0]], [first[1], second[1]])
    torch.testing.assert_close(out, full_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=ATOL, rtol=0)


def test_merge_of_parts_that_saw_no_keys():
    out = torch.randn(3, 2, 4)
    lse = torch.randn(3, 2)
    empty_out, empty_lse = torch.zeros(3, 2, 4), torch.full((3, 2), float("-inf"))
    merged, merged_lse = merge_attn_states([out, empty_out], [lse, empty_lse])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    nothing, nothing_lse = merge_attn_states([empty_out], [empty_lse])
    assert (nothing == 0).all() and torch.isneginf(nothing_lse).all()


def test_metadata_slot_mapping_and_errors():
    md = AttentionMetadata.build([(5, 3, [7, 2]), (0, 2, [4])], block_size=4, device="cpu")
    # request 0: positions 5, 6, 7 -> block 2 offsets 1..3; request 1: block 4 offsets 0, 1
    assert md.slot_mapping.tolist() == [9, 10, 11, 16, 17]
    assert md.query_start_loc.tolist() == [0, 3, 5] and md.seq_lens == [8, 2]
    assert md.block_tables.tolist() == [[7, 2], [4, 0]]
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build([(5, 4, [7, 2])], block_size=4, device="cpu")
    with pytest.raises(ValueError):
        AttentionMetadata.build_no_cache([3, 0], "cpu")


def test_backend_registry_and_cache_errors():
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("nope")
    md = AttentionMetadata.build([(4, 1, [0, 1])], block_size=4, device="cpu")
    x = torch.zeros(1, NUM_HEADS, HEAD_DIM)
    kv = torch.zeros(1, NUM_KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="need a kv_cache"):
        get_attention_backend("reference").forward(x, kv, kv, None, md)


def test_kv_cache_sizing():
    per_token = kv_bytes_per_token(30, 3, 64, "float32")
    assert per_token == 46080  # SmolLM2: 46 KB per token in fp32 (environment.md)
    assert plan_num_blocks(10 * 16 * per_token + 5, 16, per_token, max_model_len=160) == 10
    with pytest.raises(ValueError, match="at most 160"):
        plan_num_blocks(10 * 16 * per_token + 5, 16, per_token, max_model_len=161)
    caches = allocate_kv_caches(2, 5, 16, 3, 64, torch.bfloat16, "cpu")
    assert len(caches) == 2 and caches[0].k_cache.shape == (5, 16, 3, 64)
    assert caches[1].v_cache.dtype == torch.bfloat16 and caches[0].block_size == 16
    with pytest.raises(ValueError):
        KVCache(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 4))


@pytest.mark.parametrize("lq,lk,causal,dtype,tol", [
    (37, 37, True, torch.float32, 1e-5), (5, 41, False, torch.float32, 1e-5),
    (1, 300, False, torch.float32, 1e-5), (16, 16, True, torch.bfloat16, 2e-2),
    (3, 9, True, torch.float32, 1e-5),  # a causal shape the kernel cannot take: the fallback
])
def test_partial_attention_matches_the_plain_math_twin(lq, lk, causal, dtype, tol):
    gen = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(lq, 6, 16, generator=gen).to(dtype)
    k, v = (torch.randn(lk, 2, 16, generator=gen).to(dtype) for _ in range(2))
    out, lse = partial_attention(q, k, v, scale=0.3, causal=causal)
    want_out, want_lse = attention_with_lse(q, k, v, scale=0.3,
                                            causal_offset=0 if causal else None)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
