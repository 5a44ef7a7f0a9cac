"""A worker's grammars of the requests it samples under structured output, kept in step with
each request's output tokens (its SamplingContext).

A grammar is compiled the first time its request samples here and advanced by every token
sampled; when the tokens the step says exist differ from those it accepted (the request's
leader moved, or the state was dropped), it is rebuilt and replayed. The compiler (a tokenizer
load, 1-2 s) is built on the first grammar request, so a deployment that never sees one never
pays for it."""

from __future__ import annotations

from pathlib import Path

import torch

from csps.contract.step import ScheduledRequest


class GrammarBook:
    def __init__(self, model_dir: str | Path, vocab_size: int) -> None:
        self._model_dir, self._vocab_size = model_dir, vocab_size
        self._compiler = None
        self._grammars: dict[str, tuple] = {}  # request_id -> (RequestGrammar, accepted ids)

    def _compile(self, request: ScheduledRequest):
        if self._compiler is None:
            from csps.engine.structured_output import GrammarCompiler  # llguidance, on demand
            self._compiler = GrammarCompiler(self._model_dir, self._vocab_size)
        return self._compiler.compile(request.sampling_params.structured_outputs)

    def _grammar(self, request: ScheduledRequest):
        context = request.sampling_context
        outputs = list(context.output_token_ids) if context is not None else []
        entry = self._grammars.get(request.request_id)
        if entry is None or entry[1] != outputs:
            grammar = self._compile(request)
            for token_id in outputs:
                grammar.accept(token_id)
            entry = (grammar, outputs)
            self._grammars[request.request_id] = entry
        return entry[0]

    def apply_mask(self, request: ScheduledRequest, logits: torch.Tensor) -> None:
        """logits [V] fp32, in place: tokens the grammar does not allow next -> -inf."""
        self._grammar(request).apply_mask(logits)

    def accept(self, request: ScheduledRequest, token_id: int) -> None:
        grammar, accepted = self._grammars[request.request_id]
        grammar.accept(token_id)
        accepted.append(token_id)

    def forget(self, request_id: str) -> None:
        self._grammars.pop(request_id, None)
