"""The compiled CPU kernel for paged decode attention (kernels/paged_decode.cpp), built on use.

Decode attention reads every key of a request once per step, so at long contexts it is bound
by how fast the K/V cache streams through the cores. The torch-op path over views
(paged_views.py) streams it at a few GB/s (strided batched matmuls of 3 query rows); the kernel
walks each request's block table slot by slot, reads each slot's keys and values once for all
heads, splits long requests into stretches so a batch of one still keeps every thread busy,
and merges the stretches by log-sum-exp: 2x less attention time at 8k context on this machine
kind (docs/benchmarks.md, "Decode fast path").

It is built with torch.utils.cpp_extension (a C++ compiler and ninja) the first time a process
needs it, for the host's own CPU, and cached by torch in TORCH_EXTENSIONS_DIR. When it cannot
be built, or CSPS_PAGED_KERNEL=0, `kernel()` is None and decodes take the views path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_KERNELS = Path(__file__).with_name("kernels")
_SOURCE = _KERNELS / "paged_decode.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: ATen's parallel_for in the kernel


@lru_cache(maxsize=1)
def kernel():
    """The built extension module (its `paged_decode`), or None where it cannot be had."""
    if os.environ.get("CSPS_PAGED_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load
        logger.info("loading the paged decode kernel (the first time on a machine, a ~1 min "
                    "build)")
        # named by a hash of every file it is built from: a changed header rebuilds it too
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(_KERNELS.iterdir())))
        return load(name=f"csps_paged_decode_{digest.hexdigest()[:12]}",
                    sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the views path serves
        logger.warning("paged decode kernel unavailable, decodes read K/V through torch "
                       "views instead: %s", exc)
        return None


def usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors: fp32 on the CPU, and the kernel built."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 == k_cache.dtype
            and kernel() is not None)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per request over its first seq_lens[b] cached slots.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, M] int64;
    seq_lens [B] int64, each >= 1. Returns (out [B, Hq, D], lse [B, Hq]), fp32.
    """
    return tuple(kernel().paged_decode(q.contiguous(), k_cache, v_cache, block_tables,
                                       seq_lens, scale))
