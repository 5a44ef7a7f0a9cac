"""Structured output (response_format json_object / json_schema): a per-request grammar that
masks one logits row in place before sampling.

Library: llguidance (1.9.1), chosen over xgrammar (0.2.9) by benchmarks/grammar_mask.py on the
SmolLM2 tokenizer (docs/structured_output.md has the figures). Per token (fill the mask, apply
it to a 49,152-wide fp32 row, advance) xgrammar is slightly faster, 54-58 vs 61-64 µs at the
median, but the shared 43 µs apply dominates both; llguidance compiles a schema 3-5x faster
(0.7-1.0 vs 3-4 ms; a cached grammar is a ~4 µs matcher copy), names what is wrong with an
invalid schema where xgrammar raises C++ source locations or accepts it (`"minimum": "x"`),
checks a schema without a tokenizer (the API process can 400), and is one wheel with no
dependencies, where xgrammar pulls triton and a TVM FFI runtime.

Only requests with a grammar pay: the sampler calls `apply_mask` on their rows alone, and a
batch without one never touches this module. On each step, for a request with a grammar:
`apply_mask(row)` before sampling, then `accept(token)` with the sampled token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import llguidance
import llguidance.hf
import torch

from csps.engine.grammar_spec import grammar_for, validate_structured_outputs
from csps.engine.token_bitmask import apply_token_bitmask, bitmask_words
from csps.model.tokenizer import Tokenizer
from csps.request import StructuredOutputsParams

__all__ = ["GrammarCompiler", "RequestGrammar", "validate_structured_outputs"]

# What an accepted token was, for rollback: the matcher counts EOS only where the grammar
# could still go on (a top-level number); once it is stopped, EOS is ours alone.
_TOKEN, _EOS_CONSUMED, _EOS_FREE = 0, 1, 2


class RequestGrammar:
    """One request's place in its grammar. Not thread-safe: one request, one caller.

    Once the output is a complete match that nothing can extend (e.g. the closing brace of a
    JSON object), the mask allows only EOS; after EOS is accepted, `is_terminated()`."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, tokenizer_vocab: int,
                 eos_token_ids: frozenset[int]) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size  # V, the logits width
        self._tokenizer_vocab = tokenizer_vocab  # ids at or above this are never allowed
        self._eos_token_ids = eos_token_ids
        self._bitmask = torch.zeros(bitmask_words(vocab_size), dtype=torch.int32)  # [W]
        self._accepted: list[int] = []  # per accepted token: _TOKEN or an _EOS_ kind

    @property
    def num_accepted(self) -> int:
        """Tokens accepted so far, EOS included (equals the request's output tokens)."""
        return len(self._accepted)

    def compute_bitmask(self) -> torch.Tensor:
        """The allowed tokens for the next position: [ceil(V/32)] int32 on the CPU, bit j of
        word i = token 32i+j. Reused buffer, valid until the next call. Drops the GIL, so it
        may run in a thread while the model's forward runs."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(),
                                              self._bitmask.numel() * 4)
        if self._matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self._matcher.get_error()}")
        return self._bitmask

    def apply_mask(self, logits_row: torch.Tensor, bitmask: torch.Tensor | None = None) -> None:
        """logits_row [V]: tokens the grammar does not allow next become -inf, in place.
        Pass `bitmask` from compute_bitmask() to reuse one computed ahead of time."""
        if logits_row.shape != (self._vocab_size,):
            raise ValueError(f"logits row must be [{self._vocab_size}], "
                             f"got {list(logits_row.shape)}")
        apply_token_bitmask(logits_row, self.compute_bitmask() if bitmask is None else bitmask)
        if self._tokenizer_vocab < self._vocab_size:  # llguidance leaves them 0; be certain
            logits_row[self._tokenizer_vocab:] = float("-inf")

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token; ValueError (state unchanged) if the grammar
        forbids it. EOS is accepted once the output is a complete match, and again after
        that (ignore_eos)."""
        matcher = self._matcher
        stopped = matcher.is_stopped() and matcher.is_accepting() and not matcher.is_error()
        if token_id in self._eos_token_ids and (self.is_terminated() or stopped):
            kind, ok = _EOS_FREE, True
        elif token_id in self._eos_token_ids:
            kind, ok = _EOS_CONSUMED, matcher.is_accepting() and matcher.consume_token(token_id)
        else:  # unlike consume_token, a refusal leaves the matcher usable
            kind, ok = _TOKEN, not self.is_terminated() and matcher.try_consume_tokens(
                [token_id]) == 1
        if not ok:
            raise ValueError(f"token {token_id} is not allowed by the grammar here "
                             f"(after {self.num_accepted} tokens)")
        self._accepted.append(kind)

    def is_terminated(self) -> bool:
        """True once EOS has been accepted at the end of a complete match."""
        return bool(self._accepted) and self._accepted[-1] != _TOKEN

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepts (e.g. rejected speculative tokens)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} tokens")
        undone = self._accepted[len(self._accepted) - num_tokens:]
        consumed = sum(kind != _EOS_FREE for kind in undone)  # what the matcher took
        if consumed and not self._matcher.rollback(consumed):
            raise RuntimeError(f"grammar rollback failed: {self._matcher.get_error()}")
        del self._accepted[len(self._accepted) - num_tokens:]

    def reset(self) -> None:
        """Back to the start of the grammar (no tokens accepted)."""
        self._matcher.reset()
        self._accepted.clear()


class GrammarCompiler:
    """Builds RequestGrammars for one tokenizer; one per worker process (1-2 s to build:
    loading the HF tokenizer and llguidance's token tables).

    `tokenizer` is a model folder (its HF tokenizer) or a loaded Tokenizer; `vocab_size` is
    the model's logits width, at least the tokenizer's vocab. Compiled grammars are cached by
    spec (LRU, `cache_size` entries); a cache hit costs a ~4 µs matcher copy. Thread-safe."""

    def __init__(self, tokenizer: str | Path | Tokenizer, vocab_size: int,
                 eos_token_ids: list[int] | None = None, cache_size: int = 256) -> None:
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer(tokenizer)
        self.tokenizer_vocab = tokenizer.vocab_size
        if vocab_size < self.tokenizer_vocab:
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's "
                             f"{self.tokenizer_vocab} tokens")
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids or [tokenizer.eos_token_id])
        self._ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer.hf_tokenizer, n_vocab=vocab_size, eos_token=self.eos_token_ids)
        self._cache: OrderedDict[StructuredOutputsParams, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _fresh_matcher(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A copy of the cached matcher at the grammar's start (cached ones never advance)."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec].deep_copy()
        matcher = llguidance.LLMatcher(self._ll_tokenizer,
                                       grammar_for(spec, self._ll_tokenizer), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured outputs: {matcher.get_error()}")
        with self._lock:
            self._cache[spec] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return matcher.deep_copy()

    def compile(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """A fresh matcher for one request; ValueError if the spec's schema is invalid."""
        return RequestGrammar(self._fresh_matcher(spec), self.vocab_size,
                              self.tokenizer_vocab, frozenset(self.eos_token_ids))
