"""The SamplingContext a scheduled request carries: the token history its sampling needs, read
from the scheduler's books when the step is emitted (contract/sampling.py). No torch."""

from __future__ import annotations

from csps.contract.sampling import SamplingContext
from csps.request import Request


def sampling_context(request: Request, start: int, num_tokens: int,
                     do_sample: bool) -> SamplingContext | None:
    """None unless the step samples under penalties, min_tokens or a grammar, or computes
    prompt positions whose logprobs were asked for."""
    params = request.sampling_params
    wants_history = do_sample and (params.has_penalties or params.min_tokens > 0
                                   or params.structured_outputs is not None)
    num_prompt = request.num_prompt_tokens
    wants_prompt_logprobs = params.prompt_logprobs is not None and start < num_prompt - 1
    if not wants_history and not wants_prompt_logprobs:
        return None
    stops: tuple[int, ...] = ()
    if params.min_tokens > len(request.output_token_ids):
        eos = () if request.eos_token_id is None else (request.eos_token_id,)
        stops = eos + tuple(params.stop_token_ids)
    end = start + num_tokens
    return SamplingContext(
        output_token_ids=tuple(request.output_token_ids) if wants_history else (),
        prompt_token_ids=(tuple(request.prompt_token_ids)
                          if wants_history and params.repetition_penalty != 1.0 else ()),
        stop_token_ids=stops,
        num_prompt_tokens=num_prompt if wants_prompt_logprobs else 0,
        next_prompt_token_id=(request.prompt_token_ids[end]
                              if wants_prompt_logprobs and end < num_prompt else None),
    )
