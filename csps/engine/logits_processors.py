"""Per-request logits processing, in vLLM's order: logit_bias, min_tokens, then the repetition,
frequency and presence penalties on the raw logits; min_p after temperature (sampler.py).

Definitions (vLLM's): the repetition penalty divides a positive logit and multiplies a negative
one by `repetition_penalty` for every token seen in the prompt or the output; the frequency
penalty subtracts `frequency_penalty * count` and the presence penalty `presence_penalty` once
for every token generated so far; min_tokens masks EOS and the stop token ids until that many
tokens exist; min_p drops tokens whose probability is below `min_p` times the largest one.
"""

from __future__ import annotations

import torch

from csps.contract.sampling import SamplingContext
from csps.request import SamplingParams


def needs_processing(params: SamplingParams) -> bool:
    """True when a row's logits are changed before sampling (greedy rows skip this)."""
    return (params.has_penalties or bool(params.logit_bias) or params.min_tokens > 0
            or params.structured_outputs is not None)


def apply_logits_processors(logits: torch.Tensor, params: SamplingParams,
                            context: SamplingContext | None) -> torch.Tensor:
    """logits [V] fp32 -> a processed copy [V]."""
    logits = logits.clone()
    vocab_size = logits.shape[0]
    if params.logit_bias:
        ids = [t for t in params.logit_bias if t < vocab_size]
        logits[ids] += torch.tensor([params.logit_bias[t] for t in ids], dtype=logits.dtype,
                                    device=logits.device)
    if context is None:
        if params.has_penalties or params.min_tokens:
            raise ValueError("penalties and min_tokens need the request's token history")
        return logits
    outputs = torch.tensor(context.output_token_ids, dtype=torch.long, device=logits.device)
    if params.min_tokens and len(context.output_token_ids) < params.min_tokens:
        stops = [t for t in context.stop_token_ids if t < vocab_size]
        logits[stops] = float("-inf")
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(context.prompt_token_ids, dtype=torch.long, device=logits.device)
        seen = torch.cat([seen, outputs]).unique()
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                   picked * params.repetition_penalty)
        logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max,
                                  neginf=float("-inf"))  # a tiny penalty overflows fp32
    if (params.frequency_penalty or params.presence_penalty) and outputs.numel():
        counts = torch.bincount(outputs, minlength=vocab_size)[:vocab_size].to(logits.dtype)
        logits -= params.frequency_penalty * counts
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits [V] (temperature-scaled) -> logits with tokens below min_p * p_max at -inf."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
