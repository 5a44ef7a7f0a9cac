"""CSA sparse SP prefill attention (csps/parallel/csa.py) and its config (csa_config.py).

One spawn per SP size (2, 4) runs every case in gloo workers. With every stride 1 CSA must be
dense causal attention; with real strides it must equal a single-process masked attention
whose mask is built here independently: query i sees key j <= i of its own chunk, and a key of
an earlier chunk at the level l where the two ranks first share a group (the smallest l with
ri // g_l == rj // g_l) when j % s_l == h % s_l for the query's KV head h (and, for
far_queries "sampled", also i % s_l == h % s_l). The micro-batch pipeline (csa_pipeline.py)
must equal the unpipelined result (1e-5 fp32) with the same bytes, overlapped or sequential.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from gloo_harness import run_distributed

from csps.contract.csa_config import CsaConfig
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.csa import csa_attention
from csps.parallel.csa_pipeline import far_geometry, far_levels

HEAD_DIM = 16
HEADS = [(4, 2), (9, 3)]  # (Hq, Hkv)
MODES = ("all", "sampled")
CHUNKS = {2: [(37, 5), (0, 13), (11, 20)], 4: [(37, 5, 20, 11), (8, 0, 13, 9)]}
DENSE = {2: ["1:1,2:1"], 4: ["1:1,2:1,4:1", "1:1,4:1"]}
SPARSE = {2: ["1:1,2:3", "1:1,2:4"], 4: ["1:1,2:4,4:8", "1:1,2:2,4:3", "1:1,4:5"]}
BF16_CASE = {2: ((37, 5), 9, 3, "1:1,2:3"), 4: ((37, 5, 20, 11), 9, 3, "1:1,2:4,4:8")}
# Bytes: even chunks of 8 tokens, 9/3 heads, fp32, so every head keeps exactly n / s rows.
BYTE_LEVELS = {2: ("1:1,2:1", "1:1,2:4"), 4: ("1:1,2:1,4:1", "1:1,2:4,4:4")}
BYTE_CHUNK = 8
# Pipeline micro-batches "HEADSxTOKENS" (KV heads x travelling rows): uneven with Hkv 3.
MICRO = ("1x0", "0x4", "2x5", "1x1", "4x2")


def _pipe_cases(world_size: int) -> list[tuple]:
    """(base case, micro_batch): fp32 9/3 heads, every level set, both modes, and bf16."""
    cases = [(case, micro) for case in _cases(world_size) for micro in MICRO
             if case[1] == 9 and case[0] in CHUNKS[world_size][:2] and case[5] == torch.float32
             and case[3] in DENSE[world_size][:1] + SPARSE[world_size]]
    return cases + [(case, "2x3") for case in _cases(world_size) if case[5] == torch.bfloat16]


def _cases(world_size: int) -> list[tuple]:
    """(chunk_lens, Hq, Hkv, levels, far_queries, dtype) for one SP size."""
    cases = [(lens, hq, hkv, levels, mode, torch.float32)
             for levels in DENSE[world_size] + SPARSE[world_size] for mode in MODES
             for lens in CHUNKS[world_size] for hq, hkv in HEADS]
    return cases + [(*BF16_CASE[world_size], mode, torch.bfloat16) for mode in MODES]


def _inputs(chunk_lens, num_heads, num_kv_heads, dtype=torch.float32):
    """Whole-sequence q [N, Hq, D], k, v [N, Hkv, D]; seeded by the shape so ranks agree."""
    gen = torch.Generator().manual_seed(hash((tuple(chunk_lens), num_heads)) % 2**31)
    fused = torch.randn(sum(chunk_lens), num_heads + 2 * num_kv_heads, HEAD_DIM, generator=gen)
    return fused.to(dtype).split([num_heads, num_kv_heads, num_kv_heads], dim=1)


def _rows(chunk_lens, rank):
    return slice(sum(chunk_lens[:rank]), sum(chunk_lens[:rank + 1]))


def _csa_worker(rank: int, world_size: int) -> dict:
    from csps.parallel.groups import init_parallel_groups

    groups = init_parallel_groups(sp_size=world_size, tp_size=1, backend="gloo")
    comm = Communicator(groups.sp_group, CommStats(), "prefill_attn")
    outputs = {}
    for case in _cases(world_size):
        chunk_lens, num_heads, num_kv_heads, levels, mode, dtype = case
        q, k, v = _inputs(chunk_lens, num_heads, num_kv_heads, dtype)
        rows = _rows(chunk_lens, rank)
        config = CsaConfig.parse(levels, far_queries=mode)
        outputs[case] = csa_attention(q[rows], k[rows], v[rows], chunk_lens, comm, config=config)
    for case, micro in _pipe_cases(world_size):
        chunk_lens, num_heads, num_kv_heads, levels, mode, dtype = case
        q, k, v = _inputs(chunk_lens, num_heads, num_kv_heads, dtype)
        rows = _rows(chunk_lens, rank)
        config = CsaConfig.parse(levels, far_queries=mode, micro_batch=micro)
        outputs[("pipe", case, micro)] = csa_attention(q[rows], k[rows], v[rows], chunk_lens,
                                                       comm, config=config)
        if micro == "2x5" and chunk_lens == CHUNKS[world_size][0]:  # phases one after another
            geometry, times = far_geometry(config, chunk_lens), {}
            outputs[("seq", case)] = [far_levels(q[rows], k[rows], v[rows], geometry, comm, None,
                                                 config, overlap=overlap, timings=times)
                                      for overlap in (True, False)] + [sorted(times)]
    lens = (BYTE_CHUNK,) * world_size
    q, k, v = _inputs(lens, 9, 3)
    rows = _rows(lens, rank)
    for levels in BYTE_LEVELS[world_size]:
        for mode in MODES:
            for micro in ("", "2x1"):
                stats = CommStats()
                csa_attention(q[rows], k[rows], v[rows], lens,
                              Communicator(groups.sp_group, stats, "prefill_attn"),
                              config=CsaConfig.parse(levels, far_queries=mode, micro_batch=micro))
                outputs[("bytes", levels, mode, micro)] = (stats.bytes_sent["prefill_attn"],
                                                           stats.num_calls["prefill_attn"])
    try:  # the top group must be the SP group: raised before any collective
        csa_attention(q[rows], k[rows], v[rows], lens, comm, config=CsaConfig.parse("1:1"))
    except ValueError as err:
        outputs["top_error"] = str(err)
    return outputs


@functools.cache
def _outputs(world_size: int) -> list[dict]:
    return run_distributed(_csa_worker, world_size, timeout_s=180)


def _owner(chunk_lens):
    """[N] rank of each position."""
    return torch.repeat_interleave(torch.arange(len(chunk_lens)), torch.tensor(chunk_lens))


def _sparse_mask(chunk_lens, num_heads, num_kv_heads, levels, mode) -> torch.Tensor:
    """[Hq, N, N] bool: which (query, key) pairs each query head sees under CSA."""
    config = CsaConfig.parse(levels)
    num_tokens = sum(chunk_lens)
    owner = _owner(chunk_lens)
    pos = torch.arange(num_tokens)
    causal = pos[None, :] <= pos[:, None]  # [N(query), N(key)]
    mask = (owner[:, None] == owner[None, :]) & causal
    masks = mask.expand(num_heads, -1, -1).clone()
    seen = owner[:, None] == owner[None, :]  # pairs already covered by a nearer level
    for group_size, stride in config.levels[1:]:
        shared = (owner[:, None] // group_size) == (owner[None, :] // group_size)
        new = shared & ~seen & causal  # the ranks this level adds, the earlier ones only
        seen = seen | shared
        for hq in range(num_heads):
            h = hq // (num_heads // num_kv_heads)
            keep = new & ((pos[None, :] % stride == h % stride) | (pos[None, :] == 0))  # + sink
            if mode == "sampled":
                keep = keep & (pos[:, None] % stride == h % stride)
            masks[hq] |= keep
    return masks


def _masked_attention(q, k, v, masks):
    """Plain fp64 attention of q [N, Hq, D] with per-head masks [Hq, N, N] -> [N, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.double().transpose(0, 1) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(group, dim=0), vd.repeat_interleave(group, dim=0)
    scores = (qd @ kd.transpose(1, 2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~masks, float("-inf")), dim=-1)
    return (probs @ vd).transpose(0, 1).float()


def _dense(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), is_causal=True)
    return out.transpose(0, 1)


def _gathered(world_size, case):
    chunk_lens, num_heads = case[0], case[1]
    parts = [outputs[case] for outputs in _outputs(world_size)]
    for rank, (part, n) in enumerate(zip(parts, chunk_lens, strict=True)):
        assert part.shape == (n, num_heads, HEAD_DIM), (case, rank)
        assert part.dtype == case[5], (case, rank)
    return torch.cat(parts).float()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_stride_one_is_dense_causal_attention(world_size):
    for case in _cases(world_size):
        chunk_lens, num_heads, num_kv_heads, levels, mode, dtype = case
        if levels not in DENSE[world_size]:
            continue
        q, k, v = _inputs(chunk_lens, num_heads, num_kv_heads)
        torch.testing.assert_close(_gathered(world_size, case), _dense(q, k, v), atol=1e-5,
                                   rtol=1e-5, msg=lambda m, case=case: f"{case}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_sparse_matches_masked_reference(world_size):
    for case in _cases(world_size):
        chunk_lens, num_heads, num_kv_heads, levels, mode, dtype = case
        if levels not in SPARSE[world_size]:
            continue
        q, k, v = _inputs(chunk_lens, num_heads, num_kv_heads, dtype)
        got = _gathered(world_size, case)
        assert torch.isfinite(got).all(), case
        masks = _sparse_mask(chunk_lens, num_heads, num_kv_heads, levels, mode)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, _masked_attention(q, k, v, masks), atol=tol, rtol=tol,
                                   msg=lambda m, case=case: f"{case}: {m}")
        causal = torch.ones(sum(chunk_lens), sum(chunk_lens), dtype=torch.bool).tril()
        if dtype == torch.float32 and (masks != causal).any():  # the dropped keys must show
            assert not torch.allclose(got, _dense(q, k, v), atol=1e-3), case


def _expected_bytes(world_size, levels, mode, hq=9, hkv=3, dim=HEAD_DIM, e=4):
    """Per rank, from the pairs (query rank d, key rank j < d) and the level they meet at."""
    config = CsaConfig.parse(levels)
    sent = [0] * world_size
    for d in range(world_size):
        for j in range(d):
            stride = next(s for g, s in config.levels if d // g == j // g)
            kept = BYTE_CHUNK // stride  # per head, chunks of 8 and strides dividing 8
            if mode == "all":
                # sampled K and V of every KV head; rank 0 adds its position 0 (the attention
                # sink) for the heads whose stride residue misses it
                sinks = sum(1 for h in range(hkv) if h % stride) if j == 0 else 0
                sent[j] += (kept * hkv + sinks) * 2 * dim * e
            else:
                sent[d] += kept * hq * dim * e  # sampled query rows
                sent[j] += kept * hq * (dim + 1) * e  # out and lse back
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_bytes_shrink_with_the_stride(world_size):
    per_rank = _outputs(world_size)
    dense_levels, sparse_levels = BYTE_LEVELS[world_size]
    num_far_levels = len(CsaConfig.parse(dense_levels).levels) - 1
    for mode in MODES:
        for levels in (dense_levels, sparse_levels):
            got = [outputs[("bytes", levels, mode, "")] for outputs in per_rank]
            assert [b for b, _ in got] == _expected_bytes(world_size, levels, mode), (levels,
                                                                                      mode)
            calls = num_far_levels * (1 if mode == "all" else 2)
            assert [c for _, c in got] == [calls] * world_size, (levels, mode)
            piped = [outputs[("bytes", levels, mode, "2x1")] for outputs in per_rank]
            assert [b for b, _ in piped] == [b for b, _ in got], (levels, mode)  # same bytes
            # 2 head groups x one row per micro-batch: 1 / stride of the 8-token chunks
            # ("all": rank 0's sink row makes one more row where the stride is above 1)
            num_batches = sum(2 * (BYTE_CHUNK // s + (mode == "all" and s > 1))
                              for _, s in CsaConfig.parse(levels).levels[1:])
            assert [c for _, c in piped] == [calls // num_far_levels * num_batches] * world_size
        dense = sum(outputs[("bytes", dense_levels, mode, "")][0] for outputs in per_rank)
        sparse = sum(outputs[("bytes", sparse_levels, mode, "")][0] for outputs in per_rank)
        if mode == "sampled":  # queries travel: exactly 1 / stride
            assert dense == 4 * sparse, mode  # every far stride is 4
        else:  # 1 / stride plus rank 0's sink rows (exact figures: _expected_bytes above)
            assert 4 * sparse > dense > 2 * sparse, mode


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_pipeline_equals_unpipelined(world_size):
    per_rank = _outputs(world_size)
    for case, micro in _pipe_cases(world_size):
        tol = 1e-5 if case[5] == torch.float32 else 1e-2
        for rank, outputs in enumerate(per_rank):
            got, want = outputs[("pipe", case, micro)], outputs[case]
            assert got.shape == want.shape and got.dtype == want.dtype, (case, micro, rank)
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol,
                                       msg=lambda m, c=case, mb=micro: f"{c} {mb}: {m}")
    seq_cases = [key for key in per_rank[0] if key[0] == "seq"]
    assert len(seq_cases) == len(MODES) * (1 + len(SPARSE[world_size]))
    for key in seq_cases:
        mode = key[1][4]
        phases = ["compute_s", "send_s"] + (["merge_s", "return_s"] if mode == "sampled" else [])
        for outputs in per_rank:
            overlapped, sequential, times = outputs[key]
            assert times == sorted(phases), key
            assert (overlapped is None) == (sequential is None), key
            if overlapped is not None:
                for a, b in zip(overlapped, sequential, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_top_group_must_be_the_sp_group():
    for outputs in _outputs(2):
        assert "top group size 1 must equal the SP group size 2" in outputs["top_error"]


def test_parse_levels():
    config = CsaConfig.parse(" 1:1, 2:4,4:8")
    assert config.levels == ((1, 1), (2, 4), (4, 8))
    assert config.far_queries == "all" and config.text == "1:1,2:4,4:8"
    assert CsaConfig.parse("1:1", far_queries="sampled").far_queries == "sampled"
    assert not config.pipelined and (config.micro_batch_heads, config.micro_batch_tokens) == (0, 0)
    piped = CsaConfig.parse("1:1,2:4", micro_batch=" 4X100 ")
    assert piped.pipelined and (piped.micro_batch_heads, piped.micro_batch_tokens) == (4, 100)
    assert CsaConfig.parse("1:1,2:4", micro_batch="0x7").pipelined
    assert not CsaConfig.parse("1:1,2:4", micro_batch="0x0").pipelined
    for bad in ("4", "4x", "x4", "4x-1", "ax2", "1x2x3"):
        with pytest.raises(ValueError, match="micro-batch"):
            CsaConfig.parse("1:1,2:4", micro_batch=bad)
    with pytest.raises(ValueError, match="micro-batch"):
        CsaConfig(((1, 1),), micro_batch_heads=-1)
    assert CsaConfig(((1, 1), [2, 2])).levels == ((1, 1), (2, 2))
    config.check_sp_size(4)
    with pytest.raises(ValueError, match="top group size 4"):
        config.check_sp_size(8)


@pytest.mark.parametrize("text", ["", "2:1", "1:2,2:4", "1:1,2", "1:1,2:4:8", "1:1,a:4",
                                  "1:1,2:0", "1:1,0:2", "1:1,2:4,2:8", "1:1,4:2,2:4",
                                  "1:1,4:2,6:2", "1:1,-2:4", "1:1,2:1.5"])
def test_parse_rejects_bad_levels(text):
    with pytest.raises(ValueError):
        CsaConfig.parse(text)


def test_rejects_unknown_far_queries():
    with pytest.raises(ValueError, match="far_queries"):
        CsaConfig.parse("1:1,2:2", far_queries="some")
