"""Sampler: one token per row of logits, with vLLM's sampling parameters and per-request seeds.

Rows whose parameters change nothing (greedy, no penalties, bias, min_tokens or grammar) take
the batch argmax; the others run, row by row on the CPU: logits processors (logits_processors.py),
then greedy argmax or temperature, min_p, top-k, top-p and a draw by inverse CDF (one uniform
number from a generator per request, seeded from `seed` when given), so a request's samples
do not depend on its batch-mates.
Logprobs are read from the raw logits (logprobs.py). A row whose work raises fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csps.contract.sampling import TokenLogprobs
from csps.contract.step import ScheduledRequest
from csps.engine.logits_processors import apply_logits_processors, apply_min_p, needs_processing
from csps.engine.logprobs import token_logprobs
from csps.request import SamplingParams

FP32_MAX = torch.finfo(torch.float32).max


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [V] outside the top-k and the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop_sorted[0] = False  # the most likely token stays, however small top_p is
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V] by inverse CDF: a single uniform number against the fp64
    cumulative sum (torch.multinomial draws ~1 ms of randomness on a 49k row; this ~0.05 ms).
    A token of probability 0 is never drawn."""
    cdf = probs.double().cumsum(0)  # [V]
    x = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    token = int(torch.searchsorted(cdf, x, right=True))
    if token >= probs.numel():  # x rounded up to the total
        token = int(probs.nonzero()[-1])
    return token


@dataclass
class SamplerOutput:
    """Every request lands in exactly one of `sampled` and `failed`."""

    sampled: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request_id -> error message
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)


class Sampler:
    def __init__(self, seed: int = 0, grammars=None) -> None:
        self._default_generator = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.grammars = grammars  # structured output: a GrammarBook, or None

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._default_generator
        if request_id not in self._generators:
            self._generators[request_id] = torch.Generator().manual_seed(params.seed)
        return self._generators[request_id]

    def forget(self, request_ids: list[str]) -> None:
        """Drop per-request state of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)
            if self.grammars is not None:
                self.grammars.forget(request_id)

    def sample(self, logits: torch.Tensor, requests: list[ScheduledRequest]) -> SamplerOutput:
        """logits [N, V] (fp32), row i for requests[i] -> a SamplerOutput."""
        out = SamplerOutput()
        greedy = logits.argmax(dim=-1).tolist()
        for row, request in enumerate(requests):
            p = request.sampling_params
            try:
                if p.is_greedy and not needs_processing(p):
                    out.sampled[request.request_id] = greedy[row]
                else:
                    out.sampled[request.request_id] = self._sample_row(logits[row], request)
            except Exception as exc:  # noqa: BLE001 - one request's fault stays its own
                out.failed[request.request_id] = f"sampling failed: {type(exc).__name__}: {exc}"
        self._add_logprobs(logits, requests, out)
        return out

    def _sample_row(self, row_logits: torch.Tensor, request: ScheduledRequest) -> int:
        """row_logits [V] -> one token id under the request's sampling parameters."""
        p = request.sampling_params
        logits = row_logits.float().cpu()
        if needs_processing(p):
            raw = logits
            logits = apply_logits_processors(raw, p, request.sampling_context)
            if p.structured_outputs is not None:
                self.grammars.apply_mask(request, logits)
                if logits.max() == float("-inf"):  # min_tokens held off the EOS it needs
                    logits = raw.clone()
                    self.grammars.apply_mask(request, logits)
        if p.is_greedy:
            token = int(logits.argmax())
        else:
            # a tiny temperature or repetition penalty overflows fp32: cap at the largest float
            logits = (logits / p.temperature).clamp(max=FP32_MAX)
            logits = apply_min_p(logits, p.min_p)
            probs = torch.softmax(apply_top_k_top_p(logits, p.top_k, p.top_p), dim=-1)
            token = draw(probs, self._generator(request.request_id, p))
        if p.structured_outputs is not None:
            self.grammars.accept(request, token)
        return token

    def _add_logprobs(self, logits: torch.Tensor, requests: list[ScheduledRequest],
                      out: SamplerOutput) -> None:
        rows = [(row, r) for row, r in enumerate(requests)
                if r.sampling_params.logprobs is not None and r.request_id in out.sampled]
        if not rows:
            return
        index = torch.tensor([row for row, _ in rows], device=logits.device)
        entries = token_logprobs(logits.index_select(0, index),
                                 [out.sampled[r.request_id] for _, r in rows],
                                 [r.sampling_params.logprobs for _, r in rows])
        for (_, request), entry in zip(rows, entries, strict=True):
            out.logprobs[request.request_id] = entry
