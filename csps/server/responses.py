"""Engine outputs -> OpenAI response bodies: the choices of full responses and the chunks of
streamed ones, for completions and chat, with logprobs, echo and n.

Choice `index` is prompt_index * n + sample_index, as vLLM numbers them. A streamed chunk
carries one choice: the completion that changed, its delta text and the logprobs of its delta
tokens.
"""

from __future__ import annotations

from csps.engine.outputs import CompletionOutput, RequestOutput
from csps.server.logprobs import chat_logprobs, completion_logprobs
from csps.server.protocol import ChatCompletionRequest, CompletionRequest
from csps.server.protocol_responses import (
    ChatChoice,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    DeltaMessage,
    PromptTokenUsageInfo,
    UsageInfo,
)


def usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    cached = sum(o.num_cached_tokens or 0 for o in finals)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=cached))


def _delta_entries(c: CompletionOutput) -> list:
    return c.logprobs[len(c.logprobs) - len(c.delta_token_ids):] if c.delta_token_ids else []


class CompletionChoices:
    """Choices of one /v1/completions request; `decode` turns token ids into text (echo)."""

    def __init__(self, body: CompletionRequest, decode) -> None:
        self.body, self.decode = body, decode
        self._started: set[int] = set()  # streamed choices that sent their first chunk

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.decode(output.prompt_token_ids)

    def full(self, prompt_index: int, output: RequestOutput) -> list[CompletionChoice]:
        choices = []
        prefix = self._prompt_text(output) if self.body.echo else ""
        for c in output.outputs:
            logprobs = None
            if self.body.logprobs is not None:
                ids, entries = list(c.token_ids), list(c.logprobs or [])
                if self.body.echo:
                    ids = output.prompt_token_ids + ids
                    entries = list(output.prompt_logprobs or []) + entries
                logprobs = completion_logprobs(ids, entries, self.body.logprobs,
                                               lambda t: self.decode([t]))
            choices.append(CompletionChoice(
                index=prompt_index * self.body.n + c.index, text=prefix + c.text,
                logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return choices

    def chunk(self, prompt_index: int, output: RequestOutput) -> CompletionChoice:
        c = output.outputs[0]
        index = prompt_index * self.body.n + c.index
        first = index not in self._started
        self._started.add(index)
        prefix = self._prompt_text(output) if self.body.echo and first else ""
        logprobs = None
        if self.body.logprobs is not None:
            ids, entries = list(c.delta_token_ids), _delta_entries(c)
            if self.body.echo and first:
                ids = output.prompt_token_ids + ids
                entries = list(output.prompt_logprobs or []) + entries
            offset = 0 if first else len(c.text) - len(c.delta_text)
            logprobs = completion_logprobs(ids, entries, self.body.logprobs,
                                           lambda t: self.decode([t]), offset)
        return CompletionChoice(index=index, text=prefix + c.delta_text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)


class ChatChoices:
    def __init__(self, body: ChatCompletionRequest) -> None:
        self.body = body
        self.num_top = body.top_logprobs or 0
        self._started: set[int] = set()

    def full(self, output: RequestOutput) -> list[ChatChoice]:
        return [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                           logprobs=(chat_logprobs(c.token_ids, c.logprobs or [], self.num_top)
                                     if self.body.logprobs else None),
                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                for c in output.outputs]

    def chunk(self, output: RequestOutput) -> ChatStreamChoice:
        c = output.outputs[0]
        first = c.index not in self._started
        self._started.add(c.index)
        delta = DeltaMessage(role="assistant" if first else None, content=c.delta_text)
        logprobs = (chat_logprobs(c.delta_token_ids, _delta_entries(c), self.num_top)
                    if self.body.logprobs else None)
        return ChatStreamChoice(index=c.index, delta=delta, logprobs=logprobs,
                                finish_reason=c.finish_reason)
