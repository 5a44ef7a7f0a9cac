"""Collective wrappers (values and byte accounting), group validation, and the spawn harness's
failure handling. One 2-rank spawn covers every comm case."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from gloo_harness import WorkerError, run_distributed

from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import init_parallel_groups

pytestmark = pytest.mark.slow

ROW = 3  # trailing width of the test tensors: fp32 rows of 12 bytes


def _rows(rank: int, num_rows: int) -> torch.Tensor:
    """[num_rows, ROW], distinct per rank."""
    return torch.arange(num_rows * ROW, dtype=torch.float32).view(num_rows, ROW) + 100 * rank


def _comm_worker(rank: int, world_size: int) -> dict:
    groups = init_parallel_groups(sp_size=world_size, tp_size=1, backend="gloo")
    stats = CommStats()
    comm = Communicator(groups.sp_group, stats, "tp")
    res = {}
    for name, sizes in {"even": [2, 2], "uneven": [3, 0]}.items():
        stats.reset()
        res[f"gather_{name}"] = (comm.all_gather(_rows(rank, sizes[rank]), sizes),
                                 dict(stats.bytes_sent))
        stats.reset()
        res[f"scatter_{name}"] = (comm.reduce_scatter(_rows(rank, sum(sizes)), sizes),
                                  dict(stats.bytes_sent))
    stats.reset()
    sends = [torch.full((rank + 1, j), float(rank)) for j in range(world_size)]
    res["all_to_all"] = (comm.all_to_all(sends, [(j + 1, rank) for j in range(world_size)]),
                         dict(stats.bytes_sent))
    pending = comm.start_ring_shift(_rows(rank, 1 + rank).t(), (ROW, 2 - rank))  # non-contig
    res["ring"] = pending.wait()
    res["errors"] = []
    for bad in (pending.wait, lambda: Communicator(groups.sp_group, stats, "prefil"),
                lambda: init_parallel_groups(sp_size=world_size, tp_size=2)):
        try:
            bad()
        except (RuntimeError, ValueError) as err:
            res["errors"].append(type(err).__name__)
    return res


@functools.cache
def _results() -> list[dict]:
    return run_distributed(_comm_worker, 2, timeout_s=60)


def _bytes(tp: int) -> dict:
    return {"prefill_attn": 0, "decode_attn": 0, "tp": tp, "control": 0, "kv_transfer": 0}


@pytest.mark.parametrize("name, sizes", [("even", [2, 2]), ("uneven", [3, 0])])
def test_all_gather_and_reduce_scatter(name, sizes):
    results = _results()
    gathered = torch.cat([_rows(r, n) for r, n in enumerate(sizes)])
    summed = _rows(0, sum(sizes)) + _rows(1, sum(sizes))
    starts = [0, sizes[0], sum(sizes)]
    for rank, res in enumerate(results):
        out, sent = res[f"gather_{name}"]
        torch.testing.assert_close(out, gathered)
        assert sent == _bytes(sizes[rank] * ROW * 4)  # own rows x (P - 1)
        out, sent = res[f"scatter_{name}"]
        torch.testing.assert_close(out, summed[starts[rank]:starts[rank + 1]])
        assert sent == _bytes(sizes[1 - rank] * ROW * 4)  # the other rank's rows


def test_all_to_all_uneven_and_ring_shift():
    results = _results()
    for rank, res in enumerate(results):
        parts, sent = res["all_to_all"]
        for src, part in enumerate(parts):
            torch.testing.assert_close(part, torch.full((src + 1, rank), float(src)))
        other = 1 - rank
        assert sent == _bytes((rank + 1) * other * 4)  # only what leaves this rank
        torch.testing.assert_close(res["ring"], _rows(other, 2 - rank).t())
        assert res["errors"] == ["RuntimeError", "ValueError", "ValueError"]


def _fail_on_rank_1(rank: int, world_size: int) -> None:
    groups = init_parallel_groups(sp_size=world_size, tp_size=1, backend="gloo")
    if rank == 1:
        raise KeyError("boom from rank 1")
    Communicator(groups.sp_group, CommStats(), "control").all_gather(torch.ones(1), [1, 1])


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_worker_exception_reaches_parent_and_peers_are_killed():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="(?s)rank 1 of 2 raised.*KeyError: 'boom from rank 1'"):
        run_distributed(_fail_on_rank_1, 2, timeout_s=60)
    assert time.monotonic() - start < 30  # rank 0, stuck in all_gather, was killed


def test_hung_worker_times_out():
    with pytest.raises(WorkerError, match="gave no result within 3 s"):
        run_distributed(_sleep, 1, timeout_s=3)
