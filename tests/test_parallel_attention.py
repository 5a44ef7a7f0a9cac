"""SP prefill attention (Ulysses, all-gathered KV, ring) against dense causal attention.

One spawn per SP size runs every case in gloo workers and returns each rank's output rows;
the parent compares their concatenation with F.scaled_dot_product_attention(is_causal=True)
on the whole sequence: fp32 within atol = rtol = 1e-5, bf16 within 2e-2.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from gloo_harness import run_distributed

from csps.parallel.allgather_kv import allgather_kv_attention
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import init_parallel_groups
from csps.parallel.ring import ring_attention
from csps.parallel.ulysses import ulysses_attention

pytestmark = pytest.mark.slow

PATHS = {"ulysses": ulysses_attention, "allgather_kv": allgather_kv_attention,
         "ring": ring_attention}
HEADS = [(4, 2), (9, 3), (8, 8)]  # (Hq, Hkv)
HEAD_DIM = 16
CHUNKS = {1: [[29]], 2: [[37, 5], [0, 13]], 3: [[37, 5, 20], [6, 0, 9]],
          4: [[37, 5, 20, 11], [8, 8, 8, 8]]}
SCALED = (0.3, torch.float32)  # one extra case per SP size with an explicit scale
BF16 = (None, torch.bfloat16)
GRID_HEADS = {0: (4, 2), 1: (9, 3)}  # 2 x 2 grid: tp_rank -> heads of its SP group's case
GRID_CHUNKS = (37, 5)

# Bytes sent per rank for chunks BYTE_CHUNKS[:P], Hq=9, Hkv=3, D=16, fp32: one head-token row
# is 16 * 4 = 64 B, a K+V token 6 * 64 = 384 B. Ulysses heads by KV group: P=2 -> KV [2, 1],
# Q [6, 3]; P=3 -> [1, 1, 1]; P=4 -> [1, 1, 1, 0] (rank 3 idle).
#   ulysses: n_r * sum_{j != r}(hq_j + 2 hkv_j) * 64 + hq_r * (N - n_r) * 64, 2 calls
#   allgather_kv: n_r * 384 * (P - 1), 1 call; ring: (N - n_{r+1}) * 384, P - 1 hops
BYTE_CHUNKS = (6, 2, 4, 3)
EXPECTED_BYTES = {
    2: {"ulysses": [6 * 5 * 64 + 6 * 2 * 64, 2 * 10 * 64 + 3 * 6 * 64],
        "allgather_kv": [6 * 384, 2 * 384], "ring": [6 * 384, 2 * 384]},
    3: {"ulysses": [6 * 10 * 64 + 3 * 6 * 64, 2 * 10 * 64 + 3 * 10 * 64,
                    4 * 10 * 64 + 3 * 8 * 64],
        "allgather_kv": [6 * 384 * 2, 2 * 384 * 2, 4 * 384 * 2],
        "ring": [10 * 384, 8 * 384, 6 * 384]},
    4: {"ulysses": [6 * 10 * 64 + 3 * 9 * 64, 2 * 10 * 64 + 3 * 13 * 64,
                    4 * 10 * 64 + 3 * 11 * 64, 3 * 15 * 64],
        "allgather_kv": [6 * 384 * 3, 2 * 384 * 3, 4 * 384 * 3, 3 * 384 * 3],
        "ring": [13 * 384, 11 * 384, 12 * 384, 9 * 384]},
}
EXPECTED_CALLS = {"ulysses": lambda p: 2, "allgather_kv": lambda p: 1, "ring": lambda p: p - 1}


def _cases(world_size: int) -> list[tuple]:
    """(path, chunk_lens, Hq, Hkv, scale, dtype) for one SP size."""
    cases = [(path, tuple(lens), hq, hkv, None, torch.float32)
             for lens in CHUNKS[world_size] for hq, hkv in HEADS for path in PATHS]
    lens = tuple(CHUNKS[world_size][0])
    cases += [(path, lens, 9, 3, *extra) for extra in (SCALED, BF16) for path in PATHS]
    return cases


def _inputs(chunk_lens, num_heads, num_kv_heads, dtype):
    """Whole-sequence q [N, Hq, D], k, v [N, Hkv, D] as non-contiguous views of one fused
    tensor, like the model's QKV split; seeded by the shape so every rank agrees."""
    gen = torch.Generator().manual_seed(hash((tuple(chunk_lens), num_heads)) % 2**31)
    fused = torch.randn(sum(chunk_lens), num_heads + 2 * num_kv_heads, HEAD_DIM, generator=gen)
    return fused.to(dtype).split([num_heads, num_kv_heads, num_kv_heads], dim=1)


def _attention_worker(rank: int, world_size: int) -> dict:
    groups = init_parallel_groups(sp_size=world_size, tp_size=1, backend="gloo")
    comm = Communicator(groups.sp_group, CommStats(), "prefill_attn")
    outputs = {}
    for case in _cases(world_size):
        path, chunk_lens, num_heads, num_kv_heads, scale, dtype = case
        q, k, v = _inputs(chunk_lens, num_heads, num_kv_heads, dtype)
        rows = slice(sum(chunk_lens[:rank]), sum(chunk_lens[:rank + 1]))
        outputs[case] = PATHS[path](q[rows], k[rows], v[rows], chunk_lens, comm, scale=scale)
    if world_size > 1:
        outputs["bytes"] = _byte_counts(rank, world_size, groups.sp_group)
    if world_size == 4:
        outputs["grid"] = _grid_case()
    return outputs


def _byte_counts(rank: int, world_size: int, group) -> dict:
    chunk_lens = BYTE_CHUNKS[:world_size]
    q, k, v = _inputs(chunk_lens, 9, 3, torch.float32)
    rows = slice(sum(chunk_lens[:rank]), sum(chunk_lens[:rank + 1]))
    counts = {}
    for path, attention in PATHS.items():
        stats = CommStats()
        attention(q[rows], k[rows], v[rows], chunk_lens, Communicator(group, stats, "prefill_attn"))
        counts[path] = (stats.bytes_sent, stats.num_calls)
    return counts


def _grid_case() -> dict:
    """SP x TP = 2 x 2: each SP group (one per tp_rank) runs Ulysses on its own case at once."""
    groups = init_parallel_groups(sp_size=2, tp_size=2, backend="gloo")
    num_heads, num_kv_heads = GRID_HEADS[groups.tp_rank]
    q, k, v = _inputs(GRID_CHUNKS, num_heads, num_kv_heads, torch.float32)
    rows = slice(sum(GRID_CHUNKS[:groups.sp_rank]), sum(GRID_CHUNKS[:groups.sp_rank + 1]))
    comm = Communicator(groups.sp_group, CommStats(), "prefill_attn")
    out = ulysses_attention(q[rows], k[rows], v[rows], GRID_CHUNKS, comm)
    return {"out": out, "sp_rank": groups.sp_rank, "tp_rank": groups.tp_rank,
            "sp_ranks": groups.sp_ranks, "tp_ranks": groups.tp_ranks}


@functools.cache
def _outputs(world_size: int) -> list[dict]:
    return run_distributed(_attention_worker, world_size, timeout_s=120)


def _dense(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), is_causal=True, scale=scale)
    return out.transpose(0, 1)  # [N, Hq, D]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_dense_causal_attention(world_size, path):
    per_rank = _outputs(world_size)
    for case in _cases(world_size):
        if case[0] != path:
            continue
        _, chunk_lens, num_heads, num_kv_heads, scale, dtype = case
        q, k, v = _inputs(chunk_lens, num_heads, num_kv_heads, dtype)
        expected = _dense(q.float(), k.float(), v.float(), scale)
        parts = [outputs[case] for outputs in per_rank]
        for rank, (part, n) in enumerate(zip(parts, chunk_lens, strict=True)):
            assert part.shape == (n, num_heads, HEAD_DIM), (case, rank)
            assert part.dtype == dtype, (case, rank)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(torch.cat(parts).float(), expected, atol=tol, rtol=tol,
                                   msg=lambda m, case=case: f"{case}: {m}")


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_bytes_sent_per_path(world_size):
    per_rank = [outputs["bytes"] for outputs in _outputs(world_size)]
    for path, expected in EXPECTED_BYTES[world_size].items():
        for rank, counts in enumerate(per_rank):
            bytes_sent, num_calls = counts[path]
            assert bytes_sent == {"prefill_attn": expected[rank], "decode_attn": 0, "tp": 0,
                                  "control": 0, "kv_transfer": 0}, (path, rank)
            assert num_calls["prefill_attn"] == EXPECTED_CALLS[path](world_size), (path, rank)


def test_sp_groups_of_a_2x2_grid():
    grid = [outputs["grid"] for outputs in _outputs(4)]
    # rank = sp_rank * tp_size + tp_rank; SP groups share tp_rank, TP groups share sp_rank.
    assert [(g["sp_rank"], g["tp_rank"]) for g in grid] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [g["sp_ranks"] for g in grid] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["tp_ranks"] for g in grid] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for tp_rank, (num_heads, num_kv_heads) in GRID_HEADS.items():
        q, k, v = _inputs(GRID_CHUNKS, num_heads, num_kv_heads, torch.float32)
        out = torch.cat([grid[tp_rank]["out"], grid[2 + tp_rank]["out"]])
        torch.testing.assert_close(out, _dense(q, k, v, None), atol=1e-5, rtol=1e-5)
