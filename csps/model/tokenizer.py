"""Tokenizer: a transformers fast tokenizer loaded offline from a model folder, plus an
incremental detokenizer that turns a stream of token ids into text deltas."""

from __future__ import annotations

import json
from pathlib import Path

# A token can end inside a multi-byte character; its decode then ends with U+FFFD.
_INCOMPLETE = "\ufffd"


class Tokenizer:
    """encode / decode / chat template for one model folder (no network access)."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        # NOTE: a folder that names the generic fast class (our GGUF conversions do) loads it
        # directly: AutoTokenizer would also import the model's config classes, about 3 s of
        # every start here, to reach the same class.
        config = Path(folder) / "tokenizer_config.json"
        generic = config.is_file() and json.loads(config.read_text()).get(
            "tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend")
        loader = PreTrainedTokenizerFast if generic else AutoTokenizer
        self.hf_tokenizer = loader.from_pretrained(str(folder), local_files_only=True)
        if not self.hf_tokenizer.is_fast:
            raise ValueError(f"{folder}: only fast (tokenizer.json) tokenizers are supported")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf_tokenizer.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for OpenAI-style messages ({"role", "content"} dicts)."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use completions instead")
        return self.hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids for messages; ValueError if the model has no chat template."""
        # NOTE: the template already writes any BOS it wants, so no special tokens are added.
        return self.encode(self.render_chat(messages, add_generation_prompt),
                           add_special_tokens=False)

    @property
    def eos_token_id(self) -> int:
        eos = self.hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer defines no eos token")
        return eos

    @property
    def bos_token_id(self) -> int | None:
        return self.hf_tokenizer.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer knows, added tokens included (the model's may be larger)."""
        return len(self.hf_tokenizer)


class IncrementalDetokenizer:
    """Fed generated token ids one at a time, returns the text each one adds.

    Decodes a short window of recent tokens and emits what the newest ones add beyond the
    window's earlier text, so multi-byte characters split across tokens and tokenizers that
    merge spaces across tokens come out exactly as a full decode would. A delta is held back
    while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids or [])
        # Prompt tokens give context for the first delta (e.g. a leading space) but no text.
        self.prefix_offset = max(len(self.token_ids) - 5, 0)  # window start
        self.read_offset = len(self.token_ids)  # tokens before this are already emitted

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token id and return the new text (possibly "")."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back at the end of a stream (an incomplete character, as U+FFFD)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text):]
