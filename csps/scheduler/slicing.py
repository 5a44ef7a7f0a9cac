"""Chunked SP prefill, priced: which slice sizes to try and what a sliced prefill costs.

A later slice attends to every earlier one (parallel/sp_prefix.py), so its time grows linearly
with its index under a linear cost model: the first, the last full and the final slice give the
sum exactly. Used by the sps2 configurator under `--slo-tbt`. No torch.
"""

from __future__ import annotations

from csps.kvcache.placement import split_prompt
from csps.scheduler.sp_books import slice_prompt


def chunk_candidates(n: int, degree: int, block_size: int, slo_tbt: float | None,
                     chunk: int) -> list[int]:
    """Slice sizes (tokens per rank) to try: the fixed `chunk` without an SLO; with one,
    1, 2, 4, ... blocks per rank while a slice is shorter than the prompt, and 0 (whole)."""
    if slo_tbt is None:
        return [chunk]
    chunks, blocks = [], 1
    while blocks * block_size * degree < n:
        chunks.append(blocks * block_size)
        blocks *= 2
    return [*chunks, 0]


def sliced_time(n: int, group: tuple[int, ...], chunk: int, block_size: int,
                sp_size: int, price) -> tuple[float, float]:
    """(the SP prefill's seconds, its longest slice's) in slices of `chunk` per rank;
    price(chunk_lens, prefix_lens=None) is one slice's time."""
    slices = slice_prompt(n, list(group), sp_size, chunk, block_size) if chunk else None
    if not slices or len(slices) == 1:
        whole = slices[0] if slices else tuple(split_over(n, group, sp_size, block_size))
        seconds = price(list(whole))
        return seconds, seconds
    per_rank = [sum(lens[r] for lens in slices[:-1]) for r in range(sp_size)]
    full = len(slices) - 1  # slices 0 .. full-1 have the same shape
    first = price(list(slices[0]))
    before_last = [x - y for x, y in zip(per_rank, slices[0], strict=True)]
    last_full = price(list(slices[0]), prefix_lens=before_last) if full > 1 else first
    final = price(list(slices[-1]), prefix_lens=per_rank)
    return full * (first + last_full) / 2 + final, max(last_full, final)


def split_over(n: int, group: tuple[int, ...], sp_size: int, block_size: int) -> list[int]:
    """A whole prompt's chunk lengths over `group`, indexed by SP rank."""
    lens = [0] * sp_size
    for rank, length in zip(group, split_prompt(n, len(group), block_size), strict=True):
        lens[rank] = length
    return lens
