"""Running engine generations for one HTTP request: start, merge, stream as SSE, or collect.

A request with several prompts runs one engine generation per prompt, concurrently. Whatever
ends the HTTP exchange early (a client disconnect, an error, a cancelled task) closes every
engine generator, and closing one is how the engine learns to abort the request and free its KV
blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from csps.engine.errors import EngineError, RequestError
from csps.engine.outputs import RequestOutput
from csps.engine.parent_request import merge_output
from csps.request import SamplingParams
from csps.server.errors import APIError, ClientDisconnected, bad_request
from csps.server.protocol_responses import ErrorResponse

if TYPE_CHECKING:
    from csps.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")
Stream = AsyncIterator[RequestOutput]
# Builds one SSE chunk from (choice index, output, is this the choice's first output).
ChunkBuilder = Callable[[int, RequestOutput, bool], BaseModel]

DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    # NOTE: the body has been read already, so receive() only returns on http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its generations) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class PrimedStream:
    """An engine stream whose first output was awaited already (to surface errors early)."""

    def __init__(self, first: RequestOutput, stream: Stream) -> None:
        self.first: RequestOutput | None = first
        self.stream = stream

    def __aiter__(self) -> PrimedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.first is not None:
            output, self.first = self.first, None
            return output
        return await self.stream.__anext__()

    async def aclose(self) -> None:
        await self.stream.aclose()


def open_streams(engine: AsyncLLMEngine, request_id: str,
                 prompts: list[tuple[str | None, list[int]]],
                 params: list[SamplingParams]) -> list[Stream]:
    """One engine generation per prompt, with request id `{request_id}-{index}`. Nothing runs
    until a stream is iterated."""
    pairs = zip(prompts, params, strict=True)
    return [engine.generate(text, token_ids, sampling_params, f"{request_id}-{index}")
            for index, ((text, token_ids), sampling_params) in enumerate(pairs)]


async def close_streams(streams: list[Stream]) -> None:
    """Close every stream; the engine aborts those that had not finished."""
    for stream in streams:
        await stream.aclose()


async def _first_output(stream: Stream) -> RequestOutput:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise RequestError("the engine ended the request without any output") from None


async def start_streams(streams: list[Stream]) -> list[Stream]:
    """Wait for every generation's first output, so that QueueFullError or ValueError surface
    before any response is sent. On failure all generations are closed and the error raised."""
    tasks = [asyncio.ensure_future(_first_output(s)) for s in streams]
    try:
        firsts = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_streams(streams)
        raise
    return [PrimedStream(first, s) for first, s in zip(firsts, streams, strict=True)]


async def merge_streams(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) pairs from all streams in arrival order; closes them all on exit."""
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output, None))
        except Exception as exc:
            queue.put_nowait((index, None, exc))
        else:
            queue.put_nowait((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, output, exc = await queue.get()
            if exc is not None:
                raise exc
            if output is None:
                remaining -= 1
            else:
                yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def collect_final(streams: list[Stream]) -> list[RequestOutput]:
    """The finished output of each stream, in stream order. A failed request raises."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in merge_streams(streams):
        if output.error:
            raise RequestError(output.error)
        finals[index] = merge_output(finals[index], output)  # n > 1: every completion
    return finals  # type: ignore[return-value]


async def sse_events(streams: list[Stream], build_chunk: ChunkBuilder,
                     usage_chunk: Callable[[list[RequestOutput]], BaseModel] | None
                     ) -> AsyncIterator[str]:
    """One `data:` event per engine output, then the usage chunk if asked for, then [DONE].
    An engine failure mid-stream becomes an error event (the status line is already sent)."""
    finals: dict[int, RequestOutput] = {}
    seen: set[int] = set()
    try:
        async for index, output in merge_streams(streams):
            if output.error:
                raise RequestError(output.error)
            yield sse_event(build_chunk(index, output, index not in seen))
            seen.add(index)
            finals[index] = merge_output(finals.get(index), output)
        if usage_chunk is not None:
            yield sse_event(usage_chunk([finals[i] for i in sorted(finals)]))
    except Exception as exc:
        if not isinstance(exc, EngineError):
            logger.exception("Unexpected error while streaming")
        yield sse_event(ErrorResponse(error=APIError(500, f"Generation failed: {exc}").info))
    yield DONE_EVENT


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its event generator (and through it the
    engine generations) when the exchange ends, however it ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], streams: list[Stream]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # NOTE: closing `events` alone is not enough: if the client left before the first
            # event, the generator never started and its cleanup code never runs.
            await self.events.aclose()
            await close_streams(self.streams)


async def stream_response(request: Request, streams: list[Stream], build_chunk: ChunkBuilder,
                          usage_chunk: Callable[[list[RequestOutput]], BaseModel] | None
                          ) -> SSEResponse:
    """Start the generations (errors here still get a proper status) and stream them as SSE."""
    try:
        primed = await cancel_on_disconnect(request, start_streams(streams))
    except ValueError as exc:  # the engine cannot serve this request
        await close_streams(streams)
        raise bad_request(str(exc)) from exc
    except BaseException:
        await close_streams(streams)
        raise
    return SSEResponse(sse_events(primed, build_chunk, usage_chunk), primed)


async def collect_response(request: Request, streams: list[Stream]) -> list[RequestOutput]:
    """Run the generations to the end, aborting them if the client leaves first."""
    try:
        return await cancel_on_disconnect(request, collect_final(streams))
    except ValueError as exc:  # the engine cannot serve this request
        raise bad_request(str(exc)) from exc
    finally:
        await close_streams(streams)
