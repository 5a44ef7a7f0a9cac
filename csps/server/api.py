"""The OpenAI-compatible HTTP surface: `create_app(engine)` returns a FastAPI app whose routes
check and tokenize requests, then hand them to the engine (running them is streaming.py's job).

Routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize (behind the
optional bearer key), and /health, /version, /metrics (always open).
"""

from __future__ import annotations

import importlib.metadata
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import Response

from csps.engine.errors import EngineDeadError, EngineError
from csps.engine.outputs import RequestOutput
from csps.server import prompts
from csps.server.errors import APIError, install_exception_handlers
from csps.server.metrics import PrometheusStatLogger
from csps.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
)
from csps.server.streaming import collect_response, open_streams, stream_response

if TYPE_CHECKING:
    from csps.engine.async_engine import AsyncLLMEngine


def server_version() -> str:
    try:
        return importlib.metadata.version("csps")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def _usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(o.outputs[0].token_ids) for o in finals)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def _finish_reason(output: RequestOutput) -> str | None:
    return output.outputs[0].finish_reason if output.finished else None


def _require_api_key(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def check(authorization: str | None = Header(default=None)) -> None:
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected):
            raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    return check


def create_app(engine: AsyncLLMEngine, api_key: str | None = None) -> FastAPI:
    stat_logger = PrometheusStatLogger(engine.model_name, max_model_len=engine.max_model_len)
    engine.add_stat_logger(stat_logger.log)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="csps", version=server_version(), lifespan=lifespan)
    app.state.engine = engine
    app.state.stat_logger = stat_logger
    install_exception_handlers(app)
    router = APIRouter(dependencies=[Depends(_require_api_key(api_key))] if api_key else [])
    model = engine.model_name

    @router.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model, root=model, max_model_len=engine.max_model_len)])

    @router.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw_request: Request):
        prompts.check_request(engine, body)
        inputs = prompts.completion_inputs(engine, body.prompt)
        params = [prompts.sampling_params(engine, body, len(ids), body.max_tokens, "prompt")
                  for _, ids in inputs]
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = open_streams(engine, request_id, inputs, params)

        def response(choices: list[CompletionChoice], usage: UsageInfo | None):
            return CompletionResponse(id=request_id, created=created, model=model,
                                      choices=choices, usage=usage)

        if body.stream:
            def chunk(index: int, output: RequestOutput, is_first: bool) -> CompletionResponse:
                text = output.outputs[0].delta_text
                choice = CompletionChoice(index=index, text=text,
                                          finish_reason=_finish_reason(output))
                return response([choice], None)

            def usage_chunk(finals: list[RequestOutput]) -> CompletionResponse:
                return response([], _usage(finals))

            return await stream_response(raw_request, streams, chunk,
                                         usage_chunk if body.include_usage else None)
        finals = await collect_response(raw_request, streams)
        choices = [CompletionChoice(index=i, text=o.outputs[0].text,
                                    finish_reason=o.outputs[0].finish_reason,
                                    stop_reason=o.outputs[0].stop_reason)
                   for i, o in enumerate(finals)]
        return response(choices, _usage(finals))

    @router.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request):
        prompts.check_request(engine, body)
        token_ids = prompts.chat_token_ids(engine, body.messages)
        max_tokens_param = ("max_completion_tokens" if body.max_completion_tokens is not None
                            else "max_tokens")
        params = prompts.sampling_params(engine, body, len(token_ids), body.requested_max_tokens,
                                         "messages", max_tokens_param)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = open_streams(engine, request_id, [(None, token_ids)], [params])

        if body.stream:
            def chunk(index: int, output: RequestOutput, is_first: bool) -> ChatCompletionChunk:
                delta = DeltaMessage(role="assistant" if is_first else None,
                                     content=output.outputs[0].delta_text)
                choice = ChatStreamChoice(index=index, delta=delta,
                                          finish_reason=_finish_reason(output))
                return ChatCompletionChunk(id=request_id, created=created, model=model,
                                           choices=[choice])

            def usage_chunk(finals: list[RequestOutput]) -> ChatCompletionChunk:
                return ChatCompletionChunk(id=request_id, created=created, model=model,
                                           choices=[], usage=_usage(finals))

            return await stream_response(raw_request, streams, chunk,
                                         usage_chunk if body.include_usage else None)
        finals = await collect_response(raw_request, streams)
        completion = finals[0].outputs[0]
        choice = ChatChoice(index=0, message=ChatMessageOut(content=completion.text),
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason)
        return ChatCompletionResponse(id=request_id, created=created, model=model,
                                      choices=[choice], usage=_usage(finals))

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        prompts.check_model(engine, body.model)
        token_ids = prompts.tokenize_inputs(engine, body)
        return TokenizeResponse(tokens=token_ids, count=len(token_ids),
                                max_model_len=engine.max_model_len)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        prompts.check_model(engine, body.model)
        prompts.check_token_ids(engine, body.tokens, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            raise EngineDeadError("The engine has died and cannot serve requests.")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": server_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = engine.get_stats()
            stat_logger.set_load(stats["num_running"], stats["num_waiting"],
                                 stats["kv_cache_usage"])
        except EngineError:  # a dead engine still gets its last numbers scraped
            pass
        text, content_type = stat_logger.render()
        return Response(text, media_type=content_type)

    app.include_router(router)
    return app
