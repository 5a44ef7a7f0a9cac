"""The in-place paged backend ("paged") and SP holder path vs the gathering reference, fp32."""

from __future__ import annotations

import pytest
import torch

from csps.attention import AttentionMetadata, get_attention_backend
from csps.attention.paged_views import block_runs, decode_over_runs, slot_runs
from csps.attention.partial import partial_attention
from csps.kvcache.paged_cache import allocate_kv_caches

ATOL = 1e-5  # float32, same math in a different order
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 16, 4, 96


def _tables(seq_lens, layout, gen):
    """Block tables by layout: 'runs' (consecutive per request), 'shuffled', or 'shared'
    (request 1 shares request 0's first two blocks, as a prefix-cache hit would)."""
    blocks = list(range(NUM_BLOCKS)) if layout != "shuffled" else \
        torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = []
    for n in seq_lens:
        need = -(-n // BLOCK_SIZE)
        tables.append(blocks[:need])
        blocks = blocks[need:]
    if layout == "shared":
        tables[1] = tables[0][:2] + tables[1][2:]
    return tables


def _run(schedule, seq_lens, layout, seed=0, backend="paged"):
    """Feed the same steps to both backends on twin caches; every output must agree."""
    gen = torch.Generator().manual_seed(seed)
    qkv = {r: [torch.randn(n, h, HEAD_DIM, generator=gen)
               for h in (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS)] for r, n in enumerate(seq_lens)}
    if layout == "shared":  # request 1's first 8 tokens are request 0's (a shared prefix)
        for i in (1, 2):
            qkv[1][i][:2 * BLOCK_SIZE] = qkv[0][i][:2 * BLOCK_SIZE]
    tables = _tables(seq_lens, layout, gen)
    caches = [allocate_kv_caches(1, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                                 torch.float32, "cpu")[0] for _ in range(2)]
    backends = [get_attention_backend("reference"), get_attention_backend(backend)]
    computed = dict.fromkeys(range(len(seq_lens)), 0)
    if layout == "shared":
        computed[1] = 2 * BLOCK_SIZE
    for step in schedule:
        metadata = AttentionMetadata.build(
            [(computed[r], n, tables[r]) for r, n in step], BLOCK_SIZE, "cpu")
        q, k, v = (torch.cat([qkv[r][i][computed[r]:computed[r] + n] for r, n in step])
                   for i in range(3))
        expected, got = (b.forward(q, k, v, c, metadata)
                         for b, c in zip(backends, caches, strict=True))
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        for r, n in step:
            computed[r] += n


@pytest.mark.parametrize("backend", ["paged", "paged_torch"])  # kernel decodes, torch views
@pytest.mark.parametrize("layout", ["runs", "shuffled", "shared"])
def test_paged_backend_matches_reference(layout, backend):
    with torch.inference_mode():
        # chunked prefill, ragged decode batches, a decode between prefill chunks
        _run([[(0, 9)], [(0, 7), (2, 13)], [(0, 1), (2, 1)], [(2, 6), (0, 1)],
              [(0, 1), (2, 1)], [(2, 1), (0, 1)]] if layout != "shared" else
             [[(0, 17)], [(1, 6), (0, 1)], [(0, 1), (1, 1)], [(1, 1)]],
             seq_lens=[24, 20, 24], layout=layout, backend=backend)


def test_fragmented_decode_falls_back_to_gather(monkeypatch):
    monkeypatch.setattr("csps.attention.paged.MAX_RUNS", 1)
    with torch.inference_mode():
        _run([[(0, 13), (1, 9)], [(0, 1), (1, 1)], [(1, 1), (0, 1)]],
             seq_lens=[16, 12], layout="shuffled", backend="paged_torch")


def test_runs_of_blocks_and_slots():
    assert block_runs([3, 4, 9, 10, 11, 2], num_tokens=21, block_size=4) == \
        [(12, 8), (36, 12), (8, 1)]
    assert slot_runs(torch.tensor([5, 6, 7, 20, 21, 2])) == [(5, 3), (20, 2), (2, 1)]
    assert slot_runs(torch.tensor([], dtype=torch.int64)) == []


def test_decode_over_runs_matches_partial_attention():
    gen = torch.Generator().manual_seed(1)
    k_flat, v_flat = (torch.randn(64, NUM_KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    q = torch.randn(NUM_HEADS, HEAD_DIM, generator=gen)
    slots = torch.tensor([40, 41, 42, 3, 4, 60, 10, 11, 12, 13])
    out, lse = decode_over_runs(q, k_flat, v_flat, slot_runs(slots), 0.3)
    ref_out, ref_lse = partial_attention(q[None], k_flat[slots], v_flat[slots], scale=0.3)
    torch.testing.assert_close(out, ref_out[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse[0], atol=ATOL, rtol=0)


def test_sp_holder_partials_read_in_place_match_gathered():
    """q-move decode, holder side: the held slots (runs and stragglers) read in place."""
    from types import SimpleNamespace

    from csps.attention.sp_decode_plan import HeldDecode
    from csps.parallel.sp_decode import _attend_held

    gen = torch.Generator().manual_seed(2)
    cache = allocate_kv_caches(1, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                               torch.float32, "cpu")[0]
    cache.k_cache.normal_(generator=gen)
    cache.v_cache.normal_(generator=gen)
    held = [HeldDecode(0, torch.tensor([*range(8, 20), 50]), store_slot=50),
            HeldDecode(1, torch.tensor([*range(30, 37), 90, 91]), store_slot=-1)]
    width = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    received = torch.randn(2, width, generator=gen)
    with torch.inference_mode():
        got = _attend_held(received, cache, SimpleNamespace(held=held), NUM_HEADS,
                           NUM_KV_HEADS, HEAD_DIM, 0.25)
    q_size = NUM_HEADS * HEAD_DIM
    k_flat = cache.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    v_flat = cache.v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    assert torch.equal(k_flat[50].reshape(-1), received[0, q_size:q_size + NUM_KV_HEADS * HEAD_DIM])
    for i, h in enumerate(held):
        out, lse = partial_attention(received[i, :q_size].view(1, NUM_HEADS, HEAD_DIM),
                                     k_flat[h.slots], v_flat[h.slots], scale=0.25)
        torch.testing.assert_close(got[i, :q_size], out.reshape(-1), atol=ATOL, rtol=0)
        torch.testing.assert_close(got[i, q_size:], lse.reshape(-1), atol=ATOL, rtol=0)
