"""Turning an API request into engine inputs: check the model name and unsupported parameters,
tokenize prompts and chat messages, validate token ids and lengths, build SamplingParams.

Every rejection is an APIError with an OpenAI-style status, message and `param`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from csps.engine.errors import EngineDeadError
from csps.engine.grammar_spec import validate_structured_outputs
from csps.request import SamplingParams
from csps.server.errors import APIError, bad_request
from csps.server.protocol import ChatMessage, SamplingRequest, TokenizeRequest

if TYPE_CHECKING:
    from csps.engine.async_engine import AsyncLLMEngine

# (text or None, token ids) for each prompt of a request
PromptInput = tuple[str | None, list[int]]


def check_model(engine: AsyncLLMEngine, name: str | None) -> None:
    if name is not None and name != engine.model_name:
        raise APIError(404, f"The model `{name}` does not exist. This server serves "
                       f"`{engine.model_name}`.", param="model", code="model_not_found")


def check_request(engine: AsyncLLMEngine, body: SamplingRequest) -> None:
    """Model name, parameters csps does not implement, and engine liveness."""
    check_model(engine, body.model)
    unsupported = body.unsupported_parameter()
    if unsupported is not None:
        name, value = unsupported
        allowed = " or ".join(repr(v) for v in body.allowed_values[name])
        raise bad_request(f"`{name}`={value!r} is not supported by csps (leave it unset or "
                          f"{allowed}).", param=name, code="unsupported_parameter")
    if not engine.is_healthy:
        raise EngineDeadError("The engine has died and cannot serve requests.")


def _vocab_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def check_token_ids(engine: AsyncLLMEngine, token_ids: list[int], param: str) -> None:
    vocab_size = _vocab_size(engine.tokenizer)
    for token_id in token_ids:
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise bad_request(f"Token id {token_id} is out of vocabulary "
                              f"(valid ids are 0 to {vocab_size - 1}).", param=param)


def completion_inputs(engine: AsyncLLMEngine,
                      prompt: str | list[str] | list[int] | list[list[int]]) -> list[PromptInput]:
    """One (text, token ids) pair per prompt; each becomes its own choice."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # type: ignore[list-item]
    if not prompt:
        raise bad_request("The prompt is empty.", param="prompt")
    inputs = []
    for item in prompt:
        if isinstance(item, str):
            if not item:
                raise bad_request("The prompt is empty.", param="prompt")
            inputs.append((item, engine.tokenizer.encode(item, add_special_tokens=True)))
        else:
            if not item:
                raise bad_request("The prompt is empty.", param="prompt")
            check_token_ids(engine, item, "prompt")
            inputs.append((None, list(item)))
    return inputs


def _message_dicts(messages: list[ChatMessage]) -> list[dict]:
    result = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text":
                    raise bad_request(f"Only text content parts are supported, got "
                                      f"`{part.type}`.", param="messages")
            content = "\n".join(part.text or "" for part in content)
        result.append({"role": message.role, "content": content or ""})
    return result


def chat_token_ids(engine: AsyncLLMEngine, messages: list[ChatMessage],
                   add_generation_prompt: bool = True) -> list[int]:
    """Render the messages with the model's chat template."""
    try:
        token_ids = engine.tokenizer.apply_chat_template(
            _message_dicts(messages), add_generation_prompt=add_generation_prompt)
    except APIError:
        raise
    except Exception as exc:  # no template, or the template rejected the conversation
        raise bad_request(f"Cannot apply the chat template: {exc}", param="messages") from exc
    if isinstance(token_ids, Mapping):  # a tokenizer returning a BatchEncoding
        token_ids = token_ids["input_ids"]
    return list(token_ids)


def tokenize_inputs(engine: AsyncLLMEngine, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("Send exactly one of `prompt` and `messages`.", param="prompt")
    if body.messages is not None:
        return chat_token_ids(engine, body.messages, body.add_generation_prompt)
    return list(engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))


def sampling_params(engine: AsyncLLMEngine, body: SamplingRequest, num_prompt_tokens: int,
                    max_tokens: int | None, prompt_param: str,
                    max_tokens_param: str = "max_tokens") -> SamplingParams:
    """Check the prompt and output lengths against max_model_len; None max_tokens means as
    many as fit."""
    max_model_len = engine.max_model_len
    if num_prompt_tokens == 0:
        raise bad_request("The prompt is empty.", param=prompt_param)
    if num_prompt_tokens >= max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens, but "
                          f"the {prompt_param} has {num_prompt_tokens} tokens, which leaves no "
                          f"room for output. Please shorten the {prompt_param}.",
                          param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt_tokens
    elif max_tokens < 1:
        raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}.",
                          param=max_tokens_param)
    elif num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. "
                          f"However, you requested {num_prompt_tokens + max_tokens} tokens "
                          f"({num_prompt_tokens} in the {prompt_param}, {max_tokens} in the "
                          f"completion). Please reduce the length of the {prompt_param} or "
                          f"{max_tokens_param}.", param=max_tokens_param,
                          code="context_length_exceeded")
    try:
        params = body.to_sampling_params(max_tokens)
    except ValueError as exc:
        raise bad_request(str(exc), param=_param_named(body, str(exc))) from exc
    check_token_ids(engine, list(params.logit_bias or ()), "logit_bias")
    if params.structured_outputs is not None:
        try:
            validate_structured_outputs(params.structured_outputs)
        except ValueError as exc:
            raise bad_request(str(exc), param="response_format") from exc
    return params


def _param_named(body: SamplingRequest, message: str) -> str | None:
    """The request field a SamplingParams error names ("top_p must be ..." -> top_p)."""
    match = re.match(r"[a-z_]+", message)
    name = body.param_names.get(match.group(), match.group()) if match else None
    if name == "structured":  # "structured outputs take ..."
        name = "response_format"
    return name if name in type(body).model_fields else None
