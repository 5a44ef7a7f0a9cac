"""iteration_work: one SchedulerOutput -> one RankWork per SP rank, as the workers run it.

Counted the way csps/engine/sp_model_input.py splits an iteration (algorithms.md §2.1, §2.4):
an SP prefill runs alone, chunk r on SP rank r, with its own algorithm / CSA choice if the
scheduler made one (sp_work.py); otherwise every request runs on
its leader (chunks attend over their cached prefix, decodes read their KV), and decodes whose
KV spans ranks join one exchange per layer: q-move (leader sends q|k|v to each holder, holders
attend their KV and return (out, lse) in fp32; parallel/sp_decode.py) or kv-move (holders
send their KV to the leader). Under TP each RankWork is TP member tp_rank's share. No torch.
"""

from __future__ import annotations

from csps.config import ParallelConfig
from csps.contract.step import ScheduledRequest, SchedulerOutput
from csps.costmodel.base import RankWork
from csps.costmodel.shape import ModelShape
from csps.costmodel.sp_work import add_bytes, add_tp, even_split, sp_prefill_work, tp_heads

__all__ = ["iteration_work", "sp_prefill_work"]


def iteration_work(output: SchedulerOutput, shape: ModelShape, parallel: ParallelConfig,
                   block_size: int, *, tp_rank: int = 0) -> list[RankWork]:
    """[sequence_parallel_size] RankWork of one iteration (TP member tp_rank of each SP rank).

    block_size: local decodes gather whole blocks, so their KV reads round up to blocks.
    Works for sp_size 1 (a plain KVCacheManager's output: everything on rank 0). SP prefills
    (each with its own attention choice, possibly on a sub-group: zeros in sp_chunk_lens) add
    up per rank with the rest of the iteration; the real workers run one alone, the
    simulator's policies may emit several on disjoint groups.
    """
    works = _step_work(output, shape, parallel, block_size, tp_rank)
    if output.kv_moves:
        _add_moves(works, output, shape, parallel, block_size, tp_rank)
    return works


def _add_moves(works: list[RankWork], output: SchedulerOutput, shape: ModelShape,
               parallel: ParallelConfig, block_size: int, tp_rank: int) -> None:
    """KV moves after the forward (kv_moves.py): whole blocks of every layer, this TP member's
    heads, one all-to-all per layer on the step's group; the source sends them and the
    destination's link takes them all (its bytes count the received ones too)."""
    hkv = tp_heads(shape, parallel.tensor_parallel_size, tp_rank)[1]
    per_token = 2 * hkv * shape.head_dim * shape.dtype_bytes * shape.num_layers
    for move in output.kv_moves:
        num_bytes = len(move.src.block_ids) * block_size * per_token
        add_bytes(works[move.src.rank], "kv_transfer", num_bytes)
        add_bytes(works[move.dst.rank], "kv_transfer", num_bytes)
    for rank in {m.src.rank for m in output.kv_moves} | {m.dst.rank for m in output.kv_moves}:
        works[rank].num_collectives += shape.num_layers


def _step_work(output: SchedulerOutput, shape: ModelShape, parallel: ParallelConfig,
               block_size: int, tp_rank: int) -> list[RankWork]:
    sp_prefills = [r for r in output.scheduled_requests if r.is_sp_prefill]
    if not sp_prefills:
        return _local_work(output.scheduled_requests, shape, parallel, block_size, tp_rank)
    rest = [r for r in output.scheduled_requests if not r.is_sp_prefill]
    works = (_local_work(rest, shape, parallel, block_size, tp_rank) if rest
             else [RankWork() for _ in range(parallel.sequence_parallel_size)])
    for request in sp_prefills:
        part = sp_prefill_work(request.sp_chunk_lens, shape, parallel, request.sp_attention,
                               tp_rank=tp_rank, prefix_lens=_prefix_lens(request, len(works)))
        for work in part:
            work.num_sampled = 0
        part[request.leader].num_sampled = int(request.do_sample)
        works = [a + b for a, b in zip(works, part, strict=True)]
    return works


def _prefix_lens(request: ScheduledRequest, sp_size: int) -> list[int] | None:
    """Per SP rank, the tokens before a later slice of a chunked SP prefill it holds."""
    computed = request.num_computed_tokens
    if not computed:
        return None
    held = [0] * sp_size
    for r in request.kv_ranges:
        held[r.rank] += max(0, min(r.end, computed) - r.start)
    return held


def _local_work(requests: list[ScheduledRequest], shape: ModelShape, parallel: ParallelConfig,
                block_size: int, tp_rank: int) -> list[RankWork]:
    """Requests each run on their leader (chunks, decodes, q-move decodes over spread KV)."""
    sp_size, tp_size = parallel.sequence_parallel_size, parallel.tensor_parallel_size
    hq, hkv = tp_heads(shape, tp_size, tp_rank)
    works = [RankWork() for _ in range(sp_size)]
    tokens = [0] * sp_size  # tokens each SP rank runs (before the TP split)
    pairs = [0.0] * sp_size  # attention pairs with all heads
    kv_reads = [0] * sp_size  # KV positions read with all KV heads
    spread: list[tuple[ScheduledRequest, dict[int, int]]] = []  # KV over ranks, and where
    for request in requests:
        leader = request.leader if sp_size > 1 else 0
        work = works[leader]
        n, cached = request.num_scheduled_tokens, request.num_computed_tokens
        tokens[leader] += n
        work.num_seqs += 1
        work.num_sampled += int(request.do_sample)
        held = _held(request) if len(request.kv_ranges) > 1 else None
        if held is not None and len(held) > 1:  # request.is_distributed
            spread.append((request, held))
            _spread_reads(request.leader, held, parallel.sp_decode, kv_reads)
        elif n == 1 and cached > 0:  # a decode: one query over the paged blocks
            kv_reads[leader] += -(-(cached + 1) // block_size) * block_size
        else:  # a prompt chunk over its cached prefix, causal within itself
            pairs[leader] += n * cached + n * (n + 1) / 2
    for rank, work in enumerate(works):
        work.num_tokens = even_split(tokens[rank], tp_size)[tp_rank]
        work.attn_pairs = pairs[rank] * hq / shape.num_heads
        work.decode_kv_tokens = round(kv_reads[rank] * hkv / shape.num_kv_heads)
        if tokens[rank] or spread:  # the model runs here (an exchange needs every rank)
            add_tp(work, tokens[rank], shape, tp_size, tp_rank)
    if spread:
        _exchange(works, spread, shape, parallel.sp_decode, hq, hkv)
    return works


def _held(request: ScheduledRequest) -> dict[int, int]:
    """SP rank -> tokens of the request's KV it holds after this step (new token included)."""
    held: dict[int, int] = {}
    get = held.get  # NOTE: hot (every range of every spread decode, every iteration)
    for r in request.kv_ranges:
        rank = r.rank
        held[rank] = get(rank, 0) + r.end - r.start
    return held


def _spread_reads(leader: int, held: dict[int, int], mode: str, kv_reads: list[int]) -> None:
    """q-move: each holder reads its own slots; kv-move: the leader reads the whole context."""
    if mode == "kvmove":
        kv_reads[leader] += sum(held.values())
        return
    for rank, num_tokens in held.items():
        kv_reads[rank] += num_tokens


def _exchange(works: list[RankWork], spread: list[tuple[ScheduledRequest, dict[int, int]]],
              shape: ModelShape, mode: str, hq: int, hkv: int) -> None:
    """The two all-to-alls per layer of the spread decodes (every SP rank makes them); each
    rank's bytes are summed first and added once."""
    dim, e, layers = shape.head_dim, shape.dtype_bytes, shape.num_layers
    for work in works:
        work.num_collectives += 2 * layers
    sent = [0] * len(works)  # bytes per rank
    for request, held in spread:
        leader = request.leader
        for rank, num_tokens in held.items():
            if rank == leader:
                continue
            if mode == "kvmove":  # the new token's k|v out; the holder's KV (and it) back
                out, back = 2 * hkv * dim * e, num_tokens * 2 * hkv * dim * e
            else:  # q|k|v out; (out, lse) back in fp32
                out, back = (hq + 2 * hkv) * dim * e, hq * (dim + 1) * 4
            sent[leader] += layers * out
            sent[rank] += layers * back
    for work, num_bytes in zip(works, sent, strict=True):
        add_bytes(work, "decode_attn", num_bytes)
