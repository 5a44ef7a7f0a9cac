"""The prompt forms the offline API takes, as vLLM's `vllm.inputs`: a string, a list of token
ids, a `TextPrompt` ({"prompt": ...}) or a `TokensPrompt` ({"prompt_token_ids": [...]}), alone
or in a list. Anything else is refused with an error naming the form. No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the engine."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A tokenized prompt; `prompt` is its text, if the caller has it (reported back only)."""

    prompt: str


SingletonPrompt = str | list[int] | TextPrompt | TokensPrompt
PromptType = SingletonPrompt  # vLLM's name for one prompt of a decoder-only model
FORMS = ("a string, a list of token ids, {'prompt': str} (TextPrompt) or "
         "{'prompt_token_ids': list[int]} (TokensPrompt)")


def batch_prompts(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt or a sequence of them -> a list of single prompts (not yet checked)."""
    if isinstance(prompts, str | dict):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be {FORMS}, or a list of those; got "
                        f"{type(prompts).__name__}.")
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    return list(prompts)


def parse_prompt(prompt: PromptType, encode: Callable[[str], list[int]],
                 index: int = 0) -> tuple[str | None, list[int]]:
    """One prompt -> (its text if known, its token ids). `encode` tokenizes text."""
    where = f"prompts[{index}]"
    if isinstance(prompt, str):
        return prompt, encode(prompt)
    if isinstance(prompt, dict):
        return _parse_dict(prompt, encode, where)
    if isinstance(prompt, Sequence):
        return None, _token_ids(prompt, where)
    raise TypeError(f"{where} must be {FORMS}; got {type(prompt).__name__}.")


def _parse_dict(prompt: dict, encode: Callable[[str], list[int]],
                where: str) -> tuple[str | None, list[int]]:
    if "prompt" not in prompt and "prompt_token_ids" not in prompt:
        raise ValueError(f"{where} is a dict without 'prompt' or 'prompt_token_ids' (keys: "
                         f"{sorted(map(str, prompt))}); it must be a TextPrompt "
                         f"{{'prompt': str}} or a TokensPrompt {{'prompt_token_ids': [...]}}.")
    unknown = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids"}))
    if unknown:
        raise ValueError(f"{where} has keys csps does not support: {unknown}; a TextPrompt "
                         f"has 'prompt', a TokensPrompt 'prompt_token_ids' (and optionally "
                         f"'prompt').")
    text = prompt.get("prompt")
    if "prompt" in prompt and not isinstance(text, str):
        raise TypeError(f"{where}['prompt'] must be a string; got {type(text).__name__}.")
    if "prompt_token_ids" in prompt:  # a TokensPrompt (as in vLLM, it wins over 'prompt')
        return text, _token_ids(prompt["prompt_token_ids"], f"{where}['prompt_token_ids']")
    return text, encode(text)


def _token_ids(value: object, where: str) -> list[int]:
    if isinstance(value, str | bytes | dict) or not isinstance(value, Sequence):
        raise TypeError(f"{where} must be a list of token ids; got {type(value).__name__}.")
    bad = next((t for t in value if not isinstance(t, int) or isinstance(t, bool)), None)
    if bad is not None:
        raise TypeError(f"{where} must be a list of integer token ids; it holds "
                        f"{type(bad).__name__} {bad!r}.")
    return list(value)  # an empty one is the engine's "The prompt is empty."
