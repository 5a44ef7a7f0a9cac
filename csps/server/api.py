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
from fastapi.responses import PlainTextResponse, Response

from csps.engine.errors import EngineDeadError, EngineError
from csps.engine.outputs import RequestOutput
from csps.server import prompts
from csps.server.errors import APIError, install_exception_handlers
from csps.server.metrics import PrometheusStatLogger
from csps.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from csps.server.protocol_responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    UsageInfo,
)
from csps.server.responses import ChatChoices, CompletionChoices, usage
from csps.server.streaming import collect_response, open_streams, stream_response

if TYPE_CHECKING:
    from csps.engine.async_engine import AsyncLLMEngine


def server_version() -> str:
    try:
        return importlib.metadata.version("csps")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


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

        choices = CompletionChoices(body, engine.tokenizer.decode)
        if body.stream:
            def chunk(index: int, output: RequestOutput, is_first: bool) -> CompletionResponse:
                return response([choices.chunk(index, output)], None)

            def usage_chunk(finals: list[RequestOutput]) -> CompletionResponse:
                return response([], usage(finals))

            return await stream_response(raw_request, streams, chunk,
                                         usage_chunk if body.include_usage else None)
        finals = await collect_response(raw_request, streams)
        return response([c for i, o in enumerate(finals) for c in choices.full(i, o)],
                        usage(finals))

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

        choices = ChatChoices(body)
        if body.stream:
            def chunk(index: int, output: RequestOutput, is_first: bool) -> ChatCompletionChunk:
                return ChatCompletionChunk(id=request_id, created=created, model=model,
                                           choices=[choices.chunk(output)])

            def usage_chunk(finals: list[RequestOutput]) -> ChatCompletionChunk:
                return ChatCompletionChunk(id=request_id, created=created, model=model,
                                           choices=[], usage=usage(finals))

            return await stream_response(raw_request, streams, chunk,
                                         usage_chunk if body.include_usage else None)
        finals = await collect_response(raw_request, streams)
        return ChatCompletionResponse(id=request_id, created=created, model=model,
                                      choices=choices.full(finals[0]), usage=usage(finals))

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

    # response_class: /openapi.json then says what these send (no body; Prometheus text), not JSON
    @app.get("/health", response_class=Response)
    async def health() -> Response:
        if not engine.is_healthy:
            raise EngineDeadError("The engine has died and cannot serve requests.")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": server_version()}

    @app.get("/metrics", response_class=PlainTextResponse)
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
