"""Whether the engine can serve a request, checked before it is queued: prompt ids in the
vocabulary, prompt and output within max_model_len, a prompt the policy's token budget can take
whole when it does not chunk, and sampling parameters that refer to real tokens. Every refusal
is a ValueError whose message the API returns as it is. No torch."""

from __future__ import annotations

from csps.engine.grammar_spec import validate_structured_outputs
from csps.request import SamplingParams


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int,
                     max_model_len: int, scheduler) -> int:
    """The request's resolved max_tokens, or ValueError."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise ValueError("The prompt is empty.")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_token_ids):
        raise ValueError(f"Token ids must be integers in [0, {vocab_size}).")
    room = max_model_len - num_prompt
    if room < 1:
        raise ValueError(f"This model's maximum context length is {max_model_len} "
                         f"tokens. However, your prompt has {num_prompt} tokens, which "
                         f"leaves no room for output.")
    if params.max_tokens is not None and params.max_tokens > room:
        raise ValueError(f"This model's maximum context length is {max_model_len} "
                         f"tokens. However, you requested {num_prompt + params.max_tokens} "
                         f"tokens ({num_prompt} in the prompt, {params.max_tokens} for the "
                         f"completion). Please reduce the prompt or max_tokens.")
    if not scheduler.policy.chunks_prefill and num_prompt > scheduler.token_budget:
        raise ValueError(f"The prompt has {num_prompt} tokens, over the "
                         f"{scheduler.token_budget}-token budget of the "
                         f"'{scheduler.policy.name}' scheduler.")
    for token_id in params.logit_bias or ():
        if token_id >= vocab_size:
            raise ValueError(f"logit_bias token id {token_id} is out of vocabulary "
                             f"[0, {vocab_size}).")
    if params.structured_outputs is not None:
        validate_structured_outputs(params.structured_outputs)
    return params.max_tokens if params.max_tokens is not None else room
