"""SP prefill through the real model: SequenceParallelAttention vs the single-process model.

One spawn per SP size runs every case in gloo workers; each rank runs the whole model on its
chunk of one prompt (RoPE at global positions) and keeps its chunk's K/V in its own paged
cache. Tolerances (fp32): logits within atol = rtol = 1e-4 (attention sums in another order
and, for Ulysses/ring, through other kernels, so logits differ by ~1e-6..1e-5, not bitwise);
cached K/V within 1e-5; greedy tokens identical.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import pytest
import torch
from conftest import save_tiny_llama
from gloo_harness import run_distributed

from csps.attention.metadata import AttentionMetadata
from csps.kvcache.paged_cache import allocate_kv_caches
from csps.model.loader import load_model
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import init_parallel_groups
from csps.parallel.sp_attention import SequenceParallelAttention

pytestmark = pytest.mark.slow

ALGORITHMS = ("ulysses", "allgather_kv", "ring")
TINY_CHUNKS = {1: [70], 2: [45, 25], 3: [30, 15, 25], 4: [30, 5, 25, 10]}
BLOCK_SIZE = 16
NUM_DECODE = 8
LOGIT_TOL = 1e-4
KV_TOL = 1e-5
REAL_LEN = 1536
REAL_CHUNKS = {2: [820, 716], 3: [520, 490, 526]}  # uneven on purpose
REAL_ALGORITHMS = ("ulysses", "allgather_kv")


def _prompt(num_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (num_tokens,), generator=gen)  # [N] int64


def _layout(num_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The request's blocks (reversed, so slots are not positions) and each position's slot."""
    num_blocks = -(-(num_tokens + NUM_DECODE) // BLOCK_SIZE)
    block_ids = list(range(num_blocks))[::-1]
    slots = torch.tensor([block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                          for p in range(num_tokens)])  # [N] int64
    return block_ids, slots


def _new_caches(model):
    cfg = model.config
    num_blocks = -(-(sum(TINY_CHUNKS[1]) + NUM_DECODE) // BLOCK_SIZE)
    return allocate_kv_caches(cfg.num_hidden_layers, num_blocks, BLOCK_SIZE,
                              cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")


def _greedy_decode(model, caches, block_ids, first_token: int, num_computed: int) -> list[int]:
    """NUM_DECODE greedy tokens after a prefill of num_computed tokens, reference attention."""
    tokens = [first_token]
    for i in range(NUM_DECODE - 1):
        md = AttentionMetadata.build([(num_computed + i, 1, block_ids)], BLOCK_SIZE, "cpu")
        hidden = model(torch.tensor(tokens[-1:]), torch.tensor([num_computed + i]), caches, md)
        tokens.append(int(model.compute_logits(hidden)[-1].argmax()))
    return tokens


def _sp_prefill(model, comm, tokens, chunk_lens, caches, slots):
    """This rank's chunk through the model -> logits [n_r, V]."""
    rank = comm.rank
    start = sum(chunk_lens[:rank])
    rows = slice(start, start + chunk_lens[rank])
    md = AttentionMetadata.build_sp_prefill(
        chunk_lens, rank, "cpu", slot_mapping=None if slots is None else slots[rows],
        block_size=BLOCK_SIZE if slots is not None else 0)
    hidden = model(tokens[rows], torch.arange(start, rows.stop), caches, md)
    return model.compute_logits(hidden)


def _check_rejects(comm: Communicator, chunk_lens: list[int]) -> None:
    """Layouts the SP backend refuses (ValueError before any collective, so safe per rank)."""
    backend = SequenceParallelAttention(comm, "ulysses")
    n = chunk_lens[comm.rank]
    q, kv = torch.zeros(n, 4, 16), torch.zeros(n, 2, 16)
    bad = {
        "several requests": dataclasses.replace(
            AttentionMetadata.build_no_cache([1, n - 1] if n > 1 else [1, 1], "cpu"),
            sp_chunk_lens=chunk_lens),
        "cached prefix": dataclasses.replace(
            AttentionMetadata.build([(3, n, list(range(8)))], BLOCK_SIZE, "cpu"),
            sp_chunk_lens=chunk_lens),
        "chunk size": AttentionMetadata.build_sp_prefill([*chunk_lens, 1], comm.rank, "cpu"),
    }
    for reason, md in bad.items():
        with pytest.raises(ValueError):
            backend.forward(q, kv, kv, None, md)
            raise AssertionError(f"accepted {reason}")
    with pytest.raises(ValueError, match="unknown SP algorithm"):
        SequenceParallelAttention(comm, "striped")


def _tiny_worker(rank: int, world_size: int, model_dirs: list[str]) -> list[dict]:
    groups = init_parallel_groups(sp_size=world_size, tp_size=1, backend="gloo")
    comm = Communicator(groups.sp_group, CommStats(), "prefill_attn")
    _check_rejects(comm, TINY_CHUNKS[world_size])
    control = Communicator(groups.sp_group, CommStats(), "control")
    chunk_lens = TINY_CHUNKS[world_size]
    results = []
    torch.set_grad_enabled(False)
    for model_dir in model_dirs:
        for algorithm in ALGORITHMS:
            model = load_model(model_dir, attn_backend=SequenceParallelAttention(comm, algorithm))
            tokens = _prompt(sum(chunk_lens), model.config.vocab_size)
            block_ids, slots = _layout(len(tokens))
            caches = _new_caches(model)
            logits = _sp_prefill(model, comm, tokens, chunk_lens, caches, slots)
            result = {"model_dir": model_dir, "algorithm": algorithm, "logits": logits,
                      "k": [c.k_cache.clone() for c in caches],
                      "v": [c.v_cache.clone() for c in caches]}
            # Test code only: gather every rank's K/V and decode on rank 0 (reference path).
            all_logits = control.all_gather(logits, chunk_lens)  # [N, V]
            local = slots[sum(chunk_lens[:rank]):sum(chunk_lens[:rank + 1])]
            full_caches = _new_caches(model)
            for cache, full in zip(caches, full_caches, strict=True):
                heads = cache.k_cache.shape[2:]
                kv = torch.cat([cache.k_cache.view(-1, *heads)[local],
                                cache.v_cache.view(-1, *heads)[local]], dim=1)
                kv = control.all_gather(kv, chunk_lens)  # [N, 2 Hkv, D]
                full.write_slots(*kv.chunk(2, dim=1), slots)
            if rank == 0:
                result["greedy"] = _greedy_decode(model, full_caches, block_ids,
                                                  int(all_logits[-1].argmax()), len(tokens))
            results.append(result)
    return results


@functools.cache
def _single_process(model_dir: str) -> dict:
    """Reference: logits of every position (no cache), the cache it writes, greedy tokens."""
    model = load_model(model_dir)
    tokens = _prompt(sum(TINY_CHUNKS[1]), model.config.vocab_size)
    block_ids, slots = _layout(len(tokens))
    with torch.inference_mode():
        logits = model.compute_logits(model(tokens, torch.arange(len(tokens)), None,
                                            AttentionMetadata.build_no_cache([len(tokens)], "cpu")))
        caches = _new_caches(model)
        md = AttentionMetadata.build([(0, len(tokens), block_ids)], BLOCK_SIZE, "cpu")
        model(tokens, torch.arange(len(tokens)), caches, md)
        greedy = _greedy_decode(model, caches, block_ids, int(logits[-1].argmax()), len(tokens))
    return {"logits": logits, "caches": caches, "greedy": greedy, "slots": slots}


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model_dir, tmp_path_factory) -> list[str]:
    """The 4/2-head tiny Llama and a 9/3-head one (head counts not divisible by P)."""
    odd = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_9_3"), num_attention_heads=9,
                          num_key_value_heads=3, hidden_size=9 * 16, head_dim=16)
    return [str(tiny_model_dir), str(odd)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sp_prefill_matches_single_process(tiny_dirs, world_size):
    per_rank = run_distributed(_tiny_worker, world_size, tiny_dirs, timeout_s=120)
    chunk_lens = TINY_CHUNKS[world_size]
    bounds = [sum(chunk_lens[:r]) for r in range(world_size + 1)]
    for case, results in enumerate(zip(*per_rank, strict=True)):
        model_dir, algorithm = results[0]["model_dir"], results[0]["algorithm"]
        ref = _single_process(model_dir)
        label = f"{model_dir} {algorithm} P={world_size} case {case}"
        logits = torch.cat([r["logits"] for r in results])
        torch.testing.assert_close(results[-1]["logits"][-1], ref["logits"][-1],
                                   atol=LOGIT_TOL, rtol=LOGIT_TOL, msg=label)
        torch.testing.assert_close(logits, ref["logits"], atol=LOGIT_TOL, rtol=LOGIT_TOL,
                                   msg=label)
        for rank, result in enumerate(results):
            # Exactly this chunk's K/V at its slots, zeros everywhere else.
            own = ref["slots"][bounds[rank]:bounds[rank + 1]]
            for layer, ref_cache in enumerate(ref["caches"]):
                for name, got in (("k", result["k"][layer]), ("v", result["v"][layer])):
                    ref_flat = getattr(ref_cache, f"{name}_cache").flatten(0, 1)
                    expected = torch.zeros_like(ref_flat)
                    expected[own] = ref_flat[own]
                    torch.testing.assert_close(got.flatten(0, 1), expected, atol=KV_TOL,
                                               rtol=KV_TOL, msg=f"{label} rank {rank} {name}")
        assert results[0]["greedy"] == ref["greedy"], label


def _real_worker(rank: int, world_size: int, model_dir: str) -> dict:
    groups = init_parallel_groups(sp_size=world_size, tp_size=1, backend="gloo")
    comm = Communicator(groups.sp_group, CommStats(), "prefill_attn")
    control = Communicator(groups.sp_group, CommStats(), "control")
    chunk_lens = REAL_CHUNKS[world_size]
    out = {}
    torch.set_grad_enabled(False)
    for algorithm in REAL_ALGORITHMS:
        model = load_model(model_dir, attn_backend=SequenceParallelAttention(comm, algorithm))
        tokens = _prompt(REAL_LEN, model.config.vocab_size)
        control.all_gather(torch.zeros(1), [1] * world_size)  # barrier before timing
        start = time.perf_counter()
        logits = _sp_prefill(model, comm, tokens, chunk_lens, None, None)
        out[algorithm] = {"last_logits": logits[-1], "seconds": time.perf_counter() - start}
    return out


@functools.cache
def _real_single_process(model_dir: str) -> torch.Tensor:
    model = load_model(model_dir)
    tokens = _prompt(REAL_LEN, model.config.vocab_size)
    with torch.inference_mode():
        hidden = model(tokens, torch.arange(REAL_LEN), None,
                       AttentionMetadata.build_no_cache([REAL_LEN], "cpu"))
        return model.compute_logits(hidden[-1:])[0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_sp_prefill_real_model(real_model_dir, world_size):
    per_rank = run_distributed(_real_worker, world_size, str(real_model_dir), timeout_s=300)
    ref = _real_single_process(str(real_model_dir))
    for algorithm in REAL_ALGORITHMS:
        got = per_rank[-1][algorithm]["last_logits"]  # the last rank holds the last position
        torch.testing.assert_close(got, ref, atol=LOGIT_TOL, rtol=LOGIT_TOL, msg=algorithm)
        assert int(got.argmax()) == int(ref.argmax()), algorithm
