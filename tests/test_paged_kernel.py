"""The compiled paged-decode kernel (csps/attention/paged_kernel.py) vs plain float64 math.

Its slow twin is the definition of attention: each request's keys gathered from its block
table, GQA by repeating K/V, softmax in float64. Tolerance 1e-5 (fp32 sums in another order).
Lengths straddle the kernel's 512-token stretches; tables are shuffled (no two consecutive
blocks) and shared between requests, as prefix caching shares them.
"""

from __future__ import annotations

import os

import pytest
import torch

from csps.attention import paged_kernel

ATOL = 1e-5


def _oracle(q, k_cache, v_cache, tables, seq_lens, scale):
    """q [B, Hq, D] -> (out [B, Hq, D], lse [B, Hq]) in float64."""
    outs, lses = [], []
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for b, n in enumerate(seq_lens.tolist()):
        blocks = tables[b, :-(-n // block_size)]
        keys = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, 1)
        values = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale  # [Hq, n]
        lses.append(torch.logsumexp(scores, -1))
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), values))
    return torch.stack(outs), torch.stack(lses)


def test_kernel_builds_here():
    """The suite runs where a compiler is: a failed build must fail here, not pass silently
    on the views path."""
    if os.environ.get("CSPS_PAGED_KERNEL", "1") == "0":
        pytest.skip("CSPS_PAGED_KERNEL=0 turns the kernel off")
    assert paged_kernel.kernel() is not None


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 16), (8, 2, 20)])
def test_kernel_matches_oracle(heads, kv_heads, head_dim):
    if paged_kernel.kernel() is None:
        pytest.skip("kernel not built (see test_kernel_builds_here)")
    gen = torch.Generator().manual_seed(heads)
    block_size, num_blocks = 16, 800
    seq_lens = torch.tensor([1, 15, 16, 17, 511, 512, 513, 1300])
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
                        for _ in range(2))
    tables = torch.randperm(num_blocks, generator=gen)[:8 * 90].view(8, 90)
    tables[3, :1] = tables[2, :1]  # a block shared by two requests (a cached prefix)
    q = torch.randn(8, heads, head_dim, generator=gen) * 3  # peaked softmaxes too
    scale = head_dim ** -0.5
    out, lse = paged_kernel.paged_decode(q, k_cache, v_cache, tables, seq_lens, scale)
    ref_out, ref_lse = _oracle(q, k_cache, v_cache, tables, seq_lens, scale)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=0)


def test_kernel_rejects_what_it_cannot_serve():
    if paged_kernel.kernel() is None:
        pytest.skip("kernel not built (see test_kernel_builds_here)")
    k_cache = torch.zeros(4, 16, 2, 8)
    tables, q = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="bad seq_len"):
        paged_kernel.paged_decode(q, k_cache, k_cache, tables, torch.tensor([65]), 1.0)
    with pytest.raises(RuntimeError, match="fp32 only"):
        paged_kernel.paged_decode(q.double(), k_cache.double(), k_cache.double(), tables,
                                  torch.tensor([3]), 1.0)
    assert not paged_kernel.usable(q.bfloat16(), k_cache.bfloat16())
