"""SP-TP (algorithms.md §2.1): tensor-parallel linears (pure slicing, checked in-process), the
same layers with sequence all-gather / reduce-scatter over gloo, and the whole tiny Llama under
SP-TP against the single-process model. One spawn per TP size covers every distributed case."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama
from gloo_harness import run_distributed

from csps.attention.metadata import AttentionMetadata
from csps.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowLinear,
    RowParallelLinear,
    linear,
)
from csps.model.loader import load_model
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import init_parallel_groups
from csps.parallel.sp_tp import TensorParallelContext, token_split

pytestmark = pytest.mark.slow

NUM_TOKENS = 70  # the prompt of the model cases; 70 = 35 + 35 = 24 + 23 + 23
# query lens per request; "short" leaves a TP rank with no tokens
BATCHES = {"one": [NUM_TOKENS], "two": [33, 37], "short": [2]}


def _loaded(layer: torch.nn.Module, *shards: tuple) -> torch.nn.Module:
    """layer with its weight allocated and loaded from (checkpoint tensor[, shard_id]) pairs."""
    layer.weight.data = torch.empty_like(layer.weight)
    for shard in shards:
        layer.weight_loader(layer.weight, *shard)
    return layer


@pytest.mark.parametrize("tp_size", [1, 2, 3])
def test_sharded_linears_recombine_to_the_full_ones(tp_size):
    torch.manual_seed(0)
    x, h = torch.randn(5, 48), torch.randn(5, 20)  # inputs of the column / row layers
    wq, wk, wv = torch.randn(9 * 4, 48), torch.randn(3 * 4, 48), torch.randn(3 * 4, 48)
    w_gate, w_up, w_row = torch.randn(20, 48), torch.randn(20, 48), torch.randn(48, 20)
    col, qkv, merged, row = [], [], [], torch.zeros(5, 48)
    for r in range(tp_size):
        col.append(_loaded(ColumnParallelLinear(48, 20, r, tp_size), (w_gate,))(x))
        layer = _loaded(QKVParallelLinear(48, 4, 9, 3, r, tp_size),
                        (torch.cat([wq, wk, wv]),))  # a fused checkpoint tensor
        qkv.append(layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1))
        layer = _loaded(MergedColumnParallelLinear(48, [20, 20], r, tp_size), (w_gate, 0),
                        (w_up, 1))
        merged.append(layer(x).chunk(2, dim=-1))
        layer = _loaded(RowParallelLinear(20, 48, r, tp_size), (w_row,))
        row += layer(h[:, layer.input_range.start:layer.input_range.stop])
    torch.testing.assert_close(torch.cat(col, dim=-1), linear(x, w_gate))
    for i, w in enumerate((wq, wk, wv)):
        torch.testing.assert_close(torch.cat([parts[i] for parts in qkv], dim=-1), linear(x, w))
    for i, w in enumerate((w_gate, w_up)):
        torch.testing.assert_close(torch.cat([p[i] for p in merged], dim=-1), linear(x, w))
    torch.testing.assert_close(row, linear(h, w_row), atol=1e-5, rtol=1e-5)
    assert RowLinear is RowParallelLinear  # the unsharded name is tp_size 1


def test_bad_shards_raise():
    with pytest.raises(ValueError, match="tp_size"):
        QKVParallelLinear(64, 16, 4, 2, tp_rank=0, tp_size=3)  # more ranks than KV heads
    layer = _loaded(ColumnParallelLinear(8, 6, 0, 2))
    with pytest.raises(ValueError, match="rows"):
        layer.weight_loader(layer.weight, torch.zeros(5, 8))
    assert token_split(70, 3) == [24, 23, 23] and token_split(1, 2) == [1, 0]


def _tp_context(world_size: int) -> tuple[TensorParallelContext, CommStats]:
    groups = init_parallel_groups(sp_size=1, tp_size=world_size, backend="gloo")
    stats = CommStats()
    comm = Communicator(groups.tp_group, stats, "tp")
    return TensorParallelContext(groups.tp_rank, groups.tp_size, comm), stats


def _layers_case(tp: TensorParallelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Column then row parallel linear with gather / reduce-scatter, on 7 tokens (uneven)."""
    torch.manual_seed(0)
    x, w_col, w_row = torch.randn(7, 24), torch.randn(40, 24), torch.randn(24, 40)
    sizes = tp.token_split(7)
    col = _loaded(ColumnParallelLinear(24, 40, tp.tp_rank, tp.tp_size), (w_col,))
    row = _loaded(RowParallelLinear(40, 24, tp.tp_rank, tp.tp_size), (w_row,))
    out = tp.reduce_scatter(row(torch.relu(col(tp.gather(x[tp.local_rows(sizes)], sizes)))),
                            sizes)
    return out, linear(torch.relu(linear(x, w_col)), w_row)[tp.local_rows(sizes)]


def _model_logits(folder, batch: list[int], tp: TensorParallelContext | None) -> torch.Tensor:
    model = load_model(folder, tp=tp)
    input_ids = torch.randint(3, 256, (sum(batch),), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in batch])
    with torch.inference_mode():
        hidden = model(input_ids, positions, None, AttentionMetadata.build_no_cache(batch, "cpu"))
        return model.compute_logits(hidden)


def _sp_tp_worker(rank: int, world_size: int, folders: list) -> dict:
    tp, stats = _tp_context(world_size)
    res = {"layers": _layers_case(tp)}
    for folder in folders:
        for name, batch in BATCHES.items():
            stats.reset()
            res[folder, name] = (_model_logits(folder, batch, tp), dict(stats.bytes_sent),
                                 dict(stats.num_calls))
    return res


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    gqa3 = save_tiny_llama(tmp_path_factory.mktemp("tiny_9_3"), num_attention_heads=9,
                           num_key_value_heads=3, hidden_size=144, head_dim=16)
    return {"4/2": tiny_model_dir, "9/3": gqa3}


@pytest.fixture(scope="module")
def results(folders):
    """tp_size -> (the folders run, per-rank results)."""
    runs = {2: [folders["4/2"], folders["9/3"]], 3: [folders["9/3"]]}
    return {t: (runs[t], run_distributed(_sp_tp_worker, t, runs[t], timeout_s=120))
            for t in runs}


@pytest.mark.parametrize("tp_size", [2, 3])
def test_layers_with_sequence_gather_and_reduce_scatter(results, tp_size):
    for out, expected in (res["layers"] for res in results[tp_size][1]):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp_size", [2, 3])
def test_model_logits_and_tp_bytes_match_the_single_process_model(results, tp_size):
    folders, per_rank = results[tp_size]
    for folder in folders:
        config = load_model(folder).config
        hidden_bytes = config.hidden_size * 4  # one fp32 row
        for name, batch in BATCHES.items():
            expected = _model_logits(folder, batch, None)
            sizes = token_split(sum(batch), tp_size)
            for rank, res in enumerate(per_rank):
                logits, sent, calls = res[folder, name]
                torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
                # per layer 2 gathers (own rows to T-1 peers) + 2 reduce-scatters (the other
                # ranks' rows), then one gather of the final hidden states
                gather = sizes[rank] * (tp_size - 1) * hidden_bytes
                scatter = (sum(batch) - sizes[rank]) * hidden_bytes
                layers = config.num_hidden_layers
                assert sent["tp"] == layers * 2 * (gather + scatter) + gather
                assert calls["tp"] == layers * 4 + 1
                assert sent["prefill_attn"] == sent["decode_attn"] == 0
