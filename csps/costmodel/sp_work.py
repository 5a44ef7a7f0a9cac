"""The work of one SP prefill, per rank, counted the way csps/parallel runs it. No torch.

One fresh prompt split into contiguous chunks (chunk r on SP rank r; a 0 means the rank is not
in the request's group: it does nothing and sends nothing). Per algorithm (algorithms.md §2.1,
§2.2, §2.3): Ulysses ranks attend all N tokens with their share of heads (ulysses.py);
allgather_kv and ring ranks attend their chunk over every key up to its end (allgather_kv.py,
ring.py); CSA ranks attend their own block causally plus each far level's strided keys (csa.py,
csa_pipeline.py). Under TP each RankWork is one TP member's share (its heads, its token slice,
the sequence all-gathers and reduce-scatters of sp_tp.py). Bytes are CommStats' logical bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from csps.config import ParallelConfig
from csps.contract.sp_attention import SpAttention
from csps.costmodel.base import RankWork
from csps.costmodel.csa_work import csa_levels_work
from csps.costmodel.shape import ModelShape


def even_split(total: int, parts: int) -> list[int]:
    """Contiguous shares as even as possible, larger first (sp_layout / sp_tp / linear rule)."""
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def tp_heads(shape: ModelShape, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(query heads, KV heads) of one TP member: KV heads split evenly, each with its group."""
    kv = even_split(shape.num_kv_heads, tp_size)[tp_rank]
    return kv * (shape.num_heads // shape.num_kv_heads), kv


def add_bytes(work: RankWork, phase: str, num_bytes: int) -> None:
    if num_bytes:
        work.comm_bytes[phase] = work.comm_bytes.get(phase, 0) + num_bytes


def add_tp(work: RankWork, num_tokens: int, shape: ModelShape, tp_size: int,
           tp_rank: int) -> None:
    """One forward of num_tokens tokens under SP-TP: per layer two sequence all-gathers and
    two reduce-scatters of [tokens, hidden], plus the final all-gather for the LM head."""
    if tp_size == 1:
        return
    mine = even_split(num_tokens, tp_size)[tp_rank]
    row = shape.hidden_size * shape.dtype_bytes
    per_layer = 2 * mine * row * (tp_size - 1) + 2 * (num_tokens - mine) * row
    add_bytes(work, "tp", shape.num_layers * per_layer + mine * row * (tp_size - 1))
    work.num_collectives += 4 * shape.num_layers + 1


def sp_prefill_work(chunk_lens: Sequence[int], shape: ModelShape, parallel: ParallelConfig,
                    sp_attention: SpAttention | None = None, *, tp_rank: int = 0,
                    prefix_lens: Sequence[int] | None = None) -> list[RankWork]:
    """One RankWork per SP rank (len(chunk_lens) == sequence_parallel_size): TP member tp_rank
    of each SP rank. sp_attention: the request's (None: the deployment's, for the group of
    ranks with tokens). The last rank with tokens samples the first token. prefix_lens: for a
    later slice of a chunked SP prefill, the prompt's tokens before the slice each SP rank
    holds (the prefix exchange, sp_prefix.py)."""
    if len(chunk_lens) != parallel.sequence_parallel_size or min(chunk_lens, default=0) < 0:
        raise ValueError(f"chunk_lens {list(chunk_lens)} must list "
                         f"{parallel.sequence_parallel_size} lengths >= 0")
    choice = sp_attention or parallel.sp_attention_choice.for_group(
        sum(1 for n in chunk_lens if n))
    algorithm = choice.algorithm
    tp_size = parallel.tensor_parallel_size
    hq, hkv = tp_heads(shape, tp_size, tp_rank)
    members = [r for r, n in enumerate(chunk_lens) if n]  # the request's group, in order
    works = [RankWork() for _ in chunk_lens]
    group = [works[r] for r in members]
    lens = [chunk_lens[r] for r in members]
    if not members:
        return works
    if algorithm == "ulysses":
        _ulysses(group, lens, shape, hq, hkv)
    elif algorithm in ("allgather_kv", "ring"):
        _kv_layouts(group, lens, shape, hq, hkv, ring=algorithm == "ring")
    elif algorithm == "csa":
        config = choice.csa
        config.check_sp_size(len(members))
        for work, n in zip(group, lens, strict=True):  # level 0: own block, dense causal
            work.attn_pairs += n * (n + 1) / 2 * hq / shape.num_heads
        csa_levels_work(group, lens, shape, hq, hkv, config)
    else:
        raise ValueError(f"unknown SP attention {algorithm!r}")
    if prefix_lens is not None and sum(prefix_lens):
        _prefix(group, lens, [prefix_lens[r] for r in members], shape, hq, hkv, algorithm)
    for work, n in zip(group, lens, strict=True):
        work.num_tokens += even_split(n, tp_size)[tp_rank]
        work.num_seqs += 1
        add_tp(work, n, shape, tp_size, tp_rank)
    group[-1].num_sampled += 1
    return works


def _ulysses(group: list[RankWork], lens: list[int], shape: ModelShape, hq: int,
             hkv: int) -> None:
    """Heads split by KV group over the ranks; forward q|k|v, reverse out (ulysses.py)."""
    size, total, dim, e = len(group), sum(lens), shape.head_dim, shape.dtype_bytes
    kv_split = even_split(hkv, size)
    q_split = [k * (hq // hkv) if hkv else 0 for k in kv_split]
    width = [q + 2 * k for q, k in zip(q_split, kv_split, strict=True)]
    for r, (work, n) in enumerate(zip(group, lens, strict=True)):
        forward = n * (sum(width) - width[r]) * dim * e
        reverse = q_split[r] * (total - n) * dim * e
        add_bytes(work, "prefill_attn", shape.num_layers * (forward + reverse))
        work.num_collectives += 2 * shape.num_layers
        work.attn_pairs += total * (total + 1) / 2 * q_split[r] / shape.num_heads


def _kv_layouts(group: list[RankWork], lens: list[int], shape: ModelShape, hq: int, hkv: int,
                ring: bool) -> None:
    """Each rank attends its chunk over all keys up to its end; K/V all-gathered (one call
    per layer) or passed around the ring (P - 1 hops, each overlapping a block's compute)."""
    size, row = len(group), 2 * hkv * shape.head_dim * shape.dtype_bytes
    start = 0
    for r, (work, n) in enumerate(zip(group, lens, strict=True)):
        work.attn_pairs += (n * start + n * (n + 1) / 2) * hq / shape.num_heads
        start += n
        if ring:  # every block but the next rank's passes through here once
            sent = (sum(lens) - lens[(r + 1) % size]) * row if size > 1 else 0
            work.num_collectives += (size - 1) * shape.num_layers
            work.overlappable_bytes += shape.num_layers * sent
        else:
            sent = n * row * (size - 1)
            work.num_collectives += shape.num_layers
        add_bytes(work, "prefill_attn", shape.num_layers * sent)


def _prefix(group: list[RankWork], lens: list[int], held: list[int], shape: ModelShape,
            hq: int, hkv: int, algorithm: str) -> None:
    """A later slice's attention to the earlier slices, where they lie (sp_prefix.py): the
    slice's queries all-gathered, each rank attends all of them to the prefix it holds and
    returns each owner its rows' (out, lse) in fp32. Ulysses also returns its LSE (one more
    small all-to-all)."""
    size, total, dim, e = len(group), sum(lens), shape.head_dim, shape.dtype_bytes
    group_size = hq // hkv if hkv else 0
    q_split = [k * group_size for k in even_split(hkv, size)]  # ulysses' head owners
    for r, (work, n, m) in enumerate(zip(group, lens, held, strict=True)):
        work.attn_pairs += total * m * hq / shape.num_heads
        queries = n * hq * dim * e * (size - 1)
        parts = (total - n) * hq * (dim + 1) * 4
        if algorithm == "ulysses":  # the slice's LSE back from the head owners, fp32
            parts += q_split[r] * (total - n) * 4
        add_bytes(work, "prefill_attn", shape.num_layers * (queries + parts))
        work.num_collectives += (3 if algorithm == "ulysses" else 2) * shape.num_layers
