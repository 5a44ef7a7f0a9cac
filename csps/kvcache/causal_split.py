"""A prompt split over ring SP ranks so that every rank's causal prefill work is equal.

Ring attention (parallel/ring.py) keeps each rank's queries and passes the keys around, so with
contiguous chunks rank r attends its chunk over every key before it: with equal chunks the last
rank does 2P - 1 times the first rank's attention, and the step lasts as long as the last rank
(at P = 4 the attention runs at 4 / 7 of the group's compute). LoongServe balances this with
striped attention (token t on rank t mod P; their ring_context_flashattention_nopad.py);
csps balances it with uneven contiguous chunks instead, which the ring, the KV placement and
the cost model already take: earlier ranks get longer chunks.

Work model (the same as the cost model's for one rank, fitted per deployment): a chunk of n
tokens after S earlier ones costs per_token * n + per_pair * n * (S + n / 2). The whole prompt
costs W(N) = per_token * N + per_pair * N^2 / 2; boundary k is where W(S_k) = k * W(N) / P, so
every rank does W(N) / P. Boundaries are rounded to whole blocks. Pure Python.
"""

from __future__ import annotations

import math

from csps.kvcache.placement import split_prompt


def causal_balanced_split(num_tokens: int, parts: int, block_size: int, per_token: float,
                          per_pair: float) -> list[int]:
    """Contiguous chunk lengths, in rank order, summing to num_tokens, each rank's
    per_token * n + per_pair * n * (S + n / 2) as equal as whole blocks allow. Falls back to
    the even split (split_prompt) when a rank would get no whole block or the coefficients do
    not describe a growing cost."""
    if parts < 1 or block_size < 1 or num_tokens < 0:
        raise ValueError(f"bad split: num_tokens={num_tokens} parts={parts} "
                         f"block_size={block_size}")
    if per_token < 0 or per_pair <= 0 or not math.isfinite(per_token + per_pair):
        return split_prompt(num_tokens, parts, block_size)
    num_blocks = -(-num_tokens // block_size)
    if num_blocks < 2 * parts:  # too short to balance by whole blocks
        return split_prompt(num_tokens, parts, block_size)

    def work(s: float) -> float:
        return per_token * s + per_pair * s * s / 2

    total, bounds = work(num_tokens), [0]
    for k in range(1, parts):
        target = k * total / parts  # solve per_pair / 2 s^2 + per_token s = target
        s = (-per_token + math.sqrt(per_token ** 2 + 2 * per_pair * target)) / per_pair
        # in whole blocks, leaving at least one block to every rank before and after
        blocks = min(max(round(s / block_size), bounds[-1] // block_size + 1),
                     num_blocks - (parts - k))
        bounds.append(blocks * block_size)
    bounds.append(num_tokens)
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
