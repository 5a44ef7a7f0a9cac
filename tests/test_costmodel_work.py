"""Pure-Python checks of the work counts: attention pairs, tokens, sampling, idle ranks.
(Bytes against real gloo runs: test_costmodel_work_gloo.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from csps.config import ParallelConfig
from csps.contract.step import ScheduledRequest, SchedulerOutput
from csps.contract.token_range import TokenRange
from csps.costmodel.shape import ModelShape
from csps.costmodel.sp_work import sp_prefill_work
from csps.costmodel.work import iteration_work
from csps.request import SamplingParams

SHAPE = ModelShape("toy", num_layers=3, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_kv_heads=2, head_dim=16, vocab_size=100, dtype_bytes=4)


def _parallel(sp_size: int = 1, algorithm: str = "ulysses", **kw) -> ParallelConfig:
    return ParallelConfig(sequence_parallel_size=sp_size, sp_attention=algorithm, **kw)


def _req(n: int, cached: int = 0, leader: int = 0, ranges=(), sample=True, chunks=None):
    return ScheduledRequest("r", list(range(n)), cached, [], SamplingParams(), sample,
                            kv_ranges=tuple(ranges), leader=leader, sp_chunk_lens=chunks)


def test_causal_prefill_on_one_rank_counts_n_n_plus_1_over_2_pairs():
    (work,) = iteration_work(SchedulerOutput(0, [_req(100)]), SHAPE, _parallel(), 16)
    assert work.attn_pairs == 100 * 101 / 2
    assert (work.num_tokens, work.num_seqs, work.num_sampled) == (100, 1, 1)
    assert work.comm_bytes == {} and work.num_collectives == 0


@pytest.mark.parametrize("sp_size", [2, 4])
def test_ulysses_ranks_each_attend_their_share_of_heads(sp_size):
    """SP over P ranks, heads split by KV group: with H = 4 q / 4 kv heads each rank gets
    1/P of the causal pairs; every rank runs its own chunk's dense layers."""
    shape = ModelShape("mha", 2, 64, 128, 4, 4, 16, 100, dtype_bytes=4)
    works = sp_prefill_work([25] * sp_size, shape, _parallel(sp_size))
    n = 25 * sp_size
    assert [w.attn_pairs for w in works] == [n * (n + 1) / 2 / sp_size] * sp_size
    assert [w.num_tokens for w in works] == [25] * sp_size
    assert [w.num_sampled for w in works] == [0] * (sp_size - 1) + [1]


def test_kv_layouts_attend_up_to_their_chunk_end_and_csa_stride_1_is_dense():
    chunks = [30, 20, 50]
    total = sum(w.attn_pairs for w in sp_prefill_work(chunks, SHAPE, _parallel(3, "ring")))
    assert total == 100 * 101 / 2
    gathered = sp_prefill_work(chunks, SHAPE, _parallel(3, "allgather_kv"))
    assert gathered[1].attn_pairs == 20 * 30 + 20 * 21 / 2
    dense = sp_prefill_work(chunks, SHAPE, _parallel(3, "csa", csa_levels="1:1,3:1"))
    assert [w.attn_pairs for w in dense] == [w.attn_pairs for w in gathered]


def test_csa_stride_thins_far_keys_and_keeps_the_sink():
    """Stride 2 at the far level: rank 1 sees rank 0's keys i % 2 == h % 2 per KV head
    (h = 0: 0, 2, .., 28 = 15 keys; h = 1: 1, .., 29 = 15 plus the sink 0 = 16)."""
    works = sp_prefill_work([30, 20], SHAPE, _parallel(2, "csa", csa_levels="1:1,2:2"))
    group = SHAPE.num_heads // SHAPE.num_kv_heads
    far_pairs = 20 * group * (15 + 16) / SHAPE.num_heads
    assert works[1].attn_pairs == 20 * 21 / 2 + far_pairs
    assert works[0].attn_pairs == 30 * 31 / 2  # nothing earlier to see
    # rank 0 sends its 31 sampled K and V rows per layer; rank 1 sends nothing
    assert works[0].comm_bytes == {"prefill_attn": 3 * 2 * 31 * 16 * 4}
    assert works[1].comm_bytes == {}


def test_zero_chunks_are_ranks_outside_the_group():
    works = sp_prefill_work([0, 40, 40, 0], SHAPE, _parallel(4))
    assert works[0].is_idle and works[3].is_idle and not works[0].comm_bytes
    pair = sp_prefill_work([40, 40], SHAPE, _parallel(2))
    assert works[1:3] == pair


def test_decodes_read_whole_blocks_and_spread_decodes_split_reads_over_holders():
    out = SchedulerOutput(0, [_req(1, cached=20), _req(1, cached=40)])
    (work,) = iteration_work(out, SHAPE, _parallel(), 16)
    assert work.decode_kv_tokens == 32 + 48 and work.attn_pairs == 0
    ranges = (TokenRange(0, 0, 30, (0, 1)), TokenRange(1, 30, 41, (0,)))
    spread = SchedulerOutput(0, [_req(1, cached=40, leader=1, ranges=ranges)])
    for mode, reads in (("qmove", [30, 11]), ("kvmove", [0, 41])):
        works = iteration_work(spread, SHAPE, _parallel(2, sp_decode=mode), 16)
        assert [w.decode_kv_tokens for w in works] == reads
        assert [w.num_tokens for w in works] == [0, 1]
        assert all(w.num_collectives == 2 * SHAPE.num_layers for w in works)
    q_move = iteration_work(spread, SHAPE, _parallel(2), 16)
    assert q_move[1].comm_bytes["decode_attn"] == 3 * (4 + 2 * 2) * 16 * 4  # q|k|v out
    assert q_move[0].comm_bytes["decode_attn"] == 3 * 4 * 17 * 4  # (out, lse) back, fp32


def test_chunk_over_cached_prefix_and_tp_share():
    (work,) = iteration_work(SchedulerOutput(0, [_req(8, cached=32, sample=False)]), SHAPE,
                             ParallelConfig(tensor_parallel_size=2), 16, tp_rank=1)
    assert work.attn_pairs == (8 * 32 + 8 * 9 / 2) / 2  # half the heads
    assert work.num_tokens == 4 and work.num_sampled == 0
    # per layer 2 all-gathers of 4 rows and 2 reduce-scatters of the other 4; final gather
    row = 64 * 4
    assert work.comm_bytes == {"tp": 3 * (2 * 4 * row + 2 * 4 * row) + 4 * row}
    assert work.num_collectives == 4 * 3 + 1


def test_costmodel_imports_without_torch():
    code = ("import sys\nimport csps.costmodel.work, csps.costmodel.sp_work\n"
            "sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_kv_moves_count_whole_blocks_at_both_ends():
    from csps.contract.step import KvMove

    moves = [KvMove("r", TokenRange(0, 0, 32, (1, 2)), TokenRange(2, 0, 32, (5, 6))),
             KvMove("r", TokenRange(1, 32, 40, (3,)), TokenRange(2, 32, 40, (7,)))]
    works = iteration_work(SchedulerOutput(0, [], kv_moves=moves), SHAPE, _parallel(4), 16)
    block = 16 * 2 * SHAPE.num_kv_heads * SHAPE.head_dim * 4 * SHAPE.num_layers  # K and V
    assert [w.comm_bytes.get("kv_transfer", 0) for w in works] == [2 * block, block,
                                                                  3 * block, 0]
    assert [w.num_collectives for w in works] == [3, 3, 3, 0]  # one all-to-all per layer
    assert works[3].is_idle
