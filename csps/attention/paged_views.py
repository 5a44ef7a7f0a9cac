"""Attention that reads the paged KV cache in place: over runs of consecutive slots, as views.

A request's keys live in blocks of the cache [num_blocks, block_size, Hkv, D]; blocks with
consecutive ids are one contiguous stretch of the flat cache [num_slots, Hkv, D], so a slice of
it is a view, not a copy. A block table (or an SP holder's slot list) becomes a few SlotRuns;
attention runs over the views of the runs: one query's scores per run, one softmax over all
of them, and the values summed run by run. No K/V is copied. The reference (reference.py)
gathers the blocks first; this is its in-place twin, equal within 1e-5 in fp32
(tests/test_paged_attention.py).
"""

from __future__ import annotations

import torch

SlotRun = tuple[int, int]  # (first slot, number of slots) of a contiguous stretch of the cache

# NOTE: a fragmented table (e.g. blocks handed out one by one to many interleaved decodes)
# costs a few small torch calls per run; past this many runs a gather is cheaper.
MAX_RUNS = 32


def block_runs(block_ids: list[int], num_tokens: int, block_size: int) -> list[SlotRun]:
    """The slot runs holding tokens 0..num_tokens-1 of a request with these block ids."""
    runs: list[SlotRun] = []
    num_blocks = -(-num_tokens // block_size)
    for position, block in enumerate(block_ids[:num_blocks]):
        length = min(block_size, num_tokens - position * block_size)
        if runs and runs[-1][0] + runs[-1][1] == block * block_size:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((block * block_size, length))
    return runs


def slot_runs(slots: torch.Tensor) -> list[SlotRun]:
    """slots [n] int64 (any order of distinct slots, kept) -> its runs of consecutive slots."""
    if slots.numel() == 0:
        return []
    breaks = torch.nonzero(slots[1:] != slots[:-1] + 1).flatten() + 1  # run starts after 0
    starts = [0, *breaks.tolist()]
    ends = [*starts[1:], slots.numel()]
    firsts = slots[torch.tensor(starts, device=slots.device)].tolist()
    return [(first, end - start) for first, start, end in zip(firsts, starts, ends, strict=True)]


def decode_over_runs(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                     runs: list[SlotRun], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query q [Hq, D] over the keys in `runs` of k_flat/v_flat [num_slots, Hkv, D].

    Returns (out [Hq, D] in q's dtype, lse [Hq] fp32). GQA without repeating K/V: the query
    heads sharing a KV head are one [g, D] matrix against that head's keys. Needs >= 1 key.
    """
    num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    qg = q.view(num_kv_heads, group, head_dim)  # [Hkv, g, D]
    # scores per run: [Hkv, g, n_i]; k view permuted to [Hkv, D, n_i] (strided, no copy)
    scores = [torch.matmul(qg, k_flat[first:first + n].permute(1, 2, 0))
              for first, n in runs]
    scores = (scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)).float() * scale
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [Hkv, g, 1]
    probs = torch.exp(scores - lse).to(v_flat.dtype)  # [Hkv, g, L]
    out = None
    offset = 0
    for first, n in runs:
        part = torch.matmul(probs[..., offset:offset + n],
                            v_flat[first:first + n].transpose(0, 1))  # [Hkv, g, D]
        out = part if out is None else out + part
        offset += n
    return out.reshape(num_heads, head_dim).to(q.dtype), lse.reshape(num_heads)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def queries_over_runs(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                      runs: list[SlotRun], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries q [n, Hq, D] over every key in `runs` (no mask: a chunk's cached prefix).

    Returns (out [n, Hq, D] in q's dtype, lse [n, Hq] fp32), merged over the runs. GQA folds
    the query heads of a KV head into the query axis ([Hkv, n * g, D]) so K/V are not
    repeated; each run is a strided view fed to the CPU flash kernel, which returns the LSE.
    """
    from csps.attention.merge import merge_attn_states
    from csps.attention.reference import attention_with_lse

    num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    usable = (_FLASH_CPU is not None and q.device.type == "cpu" and q.dtype == k_flat.dtype
              and q.dtype in (torch.float32, torch.bfloat16))
    folded = q.view(num_queries, num_kv_heads, group, head_dim).permute(1, 0, 2, 3) \
        .reshape(1, num_kv_heads, num_queries * group, head_dim)  # [1, Hkv, n * g, D]
    outs, lses = [], []
    for first, n in runs:
        keys, values = k_flat[first:first + n], v_flat[first:first + n]  # views [n_i, Hkv, D]
        if usable:
            out, lse = _FLASH_CPU(folded, keys.transpose(0, 1)[None],
                                  values.transpose(0, 1)[None], 0.0, False, scale=scale)[:2]
            # [1, Hkv, n * g, D] -> [n, Hq, D]; lse [1, Hkv, n * g] -> [n, Hq]
            out = out[0].view(num_kv_heads, num_queries, group, head_dim).permute(1, 0, 2, 3)
            lse = lse[0].view(num_kv_heads, num_queries, group).permute(1, 0, 2)
            outs.append(out.reshape(num_queries, num_heads, head_dim))
            lses.append(lse.reshape(num_queries, num_heads).float())
        else:
            out, lse = attention_with_lse(q, keys, values, scale=scale)
            outs.append(out)
            lses.append(lse)
    return merge_attn_states(outs, lses)
