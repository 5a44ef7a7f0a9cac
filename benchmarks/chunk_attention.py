"""A prefill chunk over a cached prefix, on CPU: one SDPA over prefix + chunk with a tril mask
(the paged backend's path for a prefix in one run of blocks before 2026-12-07) against the
path it takes now (the prefix unmasked plus the chunk's own keys causal, merged by LSE).

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

from csps.attention.merge import merge_attn_states
from csps.attention.partial import partial_attention
from csps.attention.reference import _sdpa

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64
CASES = ((64, 512), (64, 3000), (64, 6872), (2048, 512), (4096, 2048))  # (prefix, chunk)


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """q [chunk, Hq, D] over k/v [prefix + chunk, Hkv, D], one SDPA with a tril mask."""
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(prefix)
    return _sdpa(q, k, v, HEAD_DIM ** -0.5, mask=mask)


def merged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """The same: the prefix unmasked, the chunk's own keys causal, merged by LSE."""
    parts = [partial_attention(q, k[:prefix], v[:prefix]),
             partial_attention(q, k[prefix:], v[prefix:], causal=True)]
    return merge_attn_states([p[0] for p in parts], [p[1] for p in parts])[0]


def best_of(fn, *args, runs: int = 3) -> float:
    fn(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


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
            diff = (masked(q, k, v, prefix) - merged(q, k, v, prefix)).abs().max().item()
            row = {"prefix": prefix, "chunk": chunk, "masked_s": best_of(masked, q, k, v, prefix),
                   "merged_s": best_of(merged, q, k, v, prefix), "max_abs_diff": diff}
        row["speedup"] = row["masked_s"] / row["merged_s"]
        rows.append(row)
        print(f"prefix {prefix:5d} chunk {chunk:5d}: masked {row['masked_s']:.3f} s, merged "
              f"{row['merged_s']:.3f} s ({row['speedup']:.2f}x), max |diff| {diff:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"unit": "seconds per layer", "threads": 1, "cases": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
