"""Sampler: one token per row of logits, with temperature, top-k, top-p and per-request seeds.

Greedy rows (temperature 0) take the argmax; the others sample on the CPU with a generator per
request (seeded from `seed` when given), so a request's samples do not depend on its batch-mates.
"""

from __future__ import annotations

import torch

from csps.request import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [V] outside the top-k and the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._default_generator = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._default_generator
        if request_id not in self._generators:
            self._generators[request_id] = torch.Generator().manual_seed(params.seed)
        return self._generators[request_id]

    def forget(self, request_ids: list[str]) -> None:
        """Drop per-request generator state of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams]) -> tuple[dict[str, int], dict[str, str]]:
        """logits [N, V] (fp32) -> ({request_id: token id}, {request_id: error message}); every
        request lands in exactly one of the two."""
        greedy = logits.argmax(dim=-1).tolist()
        sampled: dict[str, int] = {}
        failed: dict[str, str] = {}
        for row, (request_id, p) in enumerate(zip(request_ids, params, strict=True)):
            try:
                sampled[request_id] = greedy[row] if p.is_greedy else self._sample_row(
                    logits[row], request_id, p)
            except Exception as exc:  # noqa: BLE001 - one request's fault stays its own
                failed[request_id] = f"sampling failed: {type(exc).__name__}: {exc}"
        return sampled, failed

    def _sample_row(self, row_logits: torch.Tensor, request_id: str, p: SamplingParams) -> int:
        """row_logits [V] -> one token id drawn with the request's temperature, top-k, top-p."""
        masked = apply_top_k_top_p(row_logits.float().cpu() / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(masked, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, p)))
