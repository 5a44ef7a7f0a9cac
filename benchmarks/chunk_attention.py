"""A prefill chunk over a cached prefix, on CPU: one SDPA over prefix + chunk with a tril mask
(the paged backend's path for a prefix in one run of blocks before 2026-12-07, rebuilt here)
against the backend itself, which now merges the prefix, unmasked, with the chunk's own causal
keys by LSE (PagedAttentionBackend.forward on a cache whose blocks form one run).

    .venv/bin/python benchmarks/chunk_attention.py --out benchmarks/results/chunk_attention.json

SmolLM2-135M's heads (9 query, 3 KV, head_dim 64), fp32, one thread (a worker's share of this
2-core machine); seconds per layer, the faster of 3 runs; both paths are checked equal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from csps.attention import AttentionMetadata, get_attention_backend
from csps.attention.reference import _sdpa
from csps.kvcache.paged_cache import allocate_kv_caches

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
CASES = ((64, 512), (64, 3000), (64, 6872), (2048, 512), (4096, 2048))  # (prefix, chunk)


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """q [chunk, Hq, D] over k/v [prefix + chunk, Hkv, D], one SDPA with a tril mask."""
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(prefix)
    return _sdpa(q, k, v, HEAD_DIM ** -0.5, mask=mask)


def paged_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> tuple:
    """The paged backend's forward arguments for the same: the prefix's K/V already in a
    cache whose blocks (0..) form one run, the chunk's q/k/v new, the prefix computed."""
    num_blocks = -(-k.shape[0] // BLOCK_SIZE)
    cache = allocate_kv_caches(1, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, q.dtype,
                               "cpu")[0]
    cache.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:prefix] = k[:prefix]
    cache.v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:prefix] = v[:prefix]
    metadata = AttentionMetadata.build([(prefix, q.shape[0], list(range(num_blocks)))],
                                       BLOCK_SIZE, "cpu")
    return q, k[prefix:], v[prefix:], cache, metadata


def best_of(fn, *args, runs: int = 3) -> float:
    fn(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


BACKEND = get_attention_backend("paged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chunk_attention.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for prefix, chunk in CASES:
        q = torch.randn(chunk, NUM_HEADS, HEAD_DIM)  # [chunk, Hq, D]
        k, v = (torch.randn(prefix + chunk, NUM_KV_HEADS, HEAD_DIM) for _ in range(2))
        with torch.inference_mode():
            inputs = paged_inputs(q, k, v, prefix)
            diff = (masked(q, k, v, prefix) - BACKEND.forward(*inputs)).abs().max().item()
            row = {"prefix": prefix, "chunk": chunk, "masked_s": best_of(masked, q, k, v, prefix),
                   "merged_s": best_of(BACKEND.forward, *inputs), "max_abs_diff": diff}
        row["speedup"] = row["masked_s"] / row["merged_s"]
        rows.append(row)
        print(f"prefix {prefix:5d} chunk {chunk:5d}: masked {row['masked_s']:.3f} s, merged "
              f"{row['merged_s']:.3f} s ({row['speedup']:.2f}x), max |diff| {diff:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"unit": "seconds per layer", "threads": 1, "cases": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
