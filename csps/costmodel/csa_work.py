"""The far levels of a CSA prefill (algorithms.md §2.2, §2.3), counted as csa.py and
csa_pipeline.py run them: which ranks each rank sees at each level, how many sampled rows
each KV head keeps (stride, rotating offset, the sink at position 0), who attends what and
who sends what. Level 0 (own block, dense) is counted by sp_work. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from csps.contract.csa_config import CsaConfig
from csps.costmodel.base import RankWork
from csps.costmodel.shape import ModelShape


class CsaLevel:
    """One far level: far[r] = the key-holding ranks rank r sees; sampled row counts."""

    def __init__(self, lens: Sequence[int], inner: int, outer: int, stride: int) -> None:
        self.lens, self.stride = list(lens), stride
        self.starts = [sum(lens[:r]) for r in range(len(lens))]
        self.far = [range(r // outer * outer, r // inner * inner) for r in range(len(lens))]

    def count(self, rank: int, head: int) -> int:
        """Rows of rank's chunk kept by KV head `head` (csa._Level.rows, counted)."""
        start, n = self.starts[rank], self.lens[rank]
        kept = len(range((head - start) % self.stride, n, self.stride))
        sink = start == 0 < n and (kept == 0 or head % self.stride != 0)
        return kept + int(sink)

    def counts(self, rank: int, num_kv: int) -> list[int]:
        return [self.count(rank, h) for h in range(num_kv)]

    def num_batches(self, num_kv: int, config: CsaConfig) -> int:
        """Micro-batches of this level in csa_pipeline.schedule (1 without pipelining)."""
        if not config.pipelined:
            return 1
        size = len(self.lens)
        if config.far_queries == "sampled":
            senders = [r for r in range(size) if len(self.far[r])]
        else:
            senders = sorted({j for f in self.far for j in f})
        most = max((self.count(r, h) for r in senders for h in range(num_kv)), default=0)
        step_h = config.micro_batch_heads or num_kv
        step_t = config.micro_batch_tokens or max(most, 1)
        return -(-num_kv // step_h) * -(-max(most, 1) // step_t)


def csa_levels_work(group: list[RankWork], lens: list[int], shape: ModelShape, hq: int,
                    hkv: int, config: CsaConfig) -> None:
    """Adds every far level's pairs, bytes (phase prefill_attn), collectives and overlappable
    bytes to the ranks of the request's group (lens: their chunk lengths, all > 0)."""
    levels = config.levels
    g = hq // hkv  # query heads per KV head
    dim, e, layers = shape.head_dim, shape.dtype_bytes, shape.num_layers
    for (inner, _), (outer, stride) in zip(levels, levels[1:], strict=False):
        level = CsaLevel(lens, inner, outer, stride)
        batches = level.num_batches(hkv, config)
        counts = [level.counts(r, hkv) for r in range(len(lens))]
        for r, work in enumerate(group):
            if config.far_queries == "all":
                sent = _keys_travel(level, r, counts, group, lens, g, dim, e, shape.num_heads)
                work.num_collectives += batches * layers
            else:
                sent = _queries_travel(level, r, counts, group, g, dim, e, shape.num_heads)
                work.num_collectives += 2 * batches * layers
            if sent:
                work.comm_bytes["prefill_attn"] = (work.comm_bytes.get("prefill_attn", 0)
                                                   + layers * sent)
            # NOTE: the pipeline hides send(m+1) behind compute(m): all but about one
            # micro-batch's bytes overlap (an estimate; the first send never does).
            work.overlappable_bytes += layers * sent * (batches - 1) // batches


def _keys_travel(level: CsaLevel, r: int, counts, group, lens, g, dim, e, num_heads) -> int:
    """far_queries "all": rank r's sampled K/V go to every later rank that sees it; each
    querier attends all its rows to the far keys. Returns the bytes r sends per layer."""
    keys = [sum(counts[src][h] for src in level.far[r]) for h in range(len(counts[r]))]
    group[r].attn_pairs += sum(lens[r] * g * c for c in keys) / num_heads
    readers = sum(1 for dst in range(len(group)) if r in level.far[dst])
    return readers * 2 * sum(counts[r]) * dim * e


def _queries_travel(level: CsaLevel, r: int, counts, group, g, dim, e, num_heads) -> int:
    """far_queries "sampled": rank r's sampled query rows go to its far ranks, which attend
    them to their own sampled keys and send back out with lse. Returns r's bytes per layer."""
    lse_cols = max(1, 4 // e)  # the fp32 lse travels as 1 (fp32) or 2 (16-bit) columns
    sent = len(level.far[r]) * sum(counts[r]) * g * dim * e
    for src in range(len(group)):
        if r in level.far[src]:  # r holds keys for src: attends src's rows, replies
            group[r].attn_pairs += sum(m * g * c for m, c in zip(counts[src], counts[r],
                                                                 strict=True)) / num_heads
            sent += sum(counts[src]) * g * (dim + lse_cols) * e
    return sent
