"""OpenAI-shaped error responses and the exception handlers that produce them.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`: the
client's mistakes as 4xx, engine overload or death as 503, anything unexpected as 500 (logged
here, never sent as a stack trace).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csps.engine.errors import EngineDeadError, QueueFullError, RequestError
from csps.server.protocol_responses import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# 499: nginx's "client closed request"; the body is never read, the status shows in access logs.
CLIENT_CLOSED_REQUEST = 499


class APIError(Exception):
    """Raised by route code; becomes an error response with this status and body."""

    def __init__(self, status_code: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(
            message=message,
            type=type or ("invalid_request_error" if status_code < 500 else "server_error"),
            param=param,
            code=code,
        )


class ClientDisconnected(Exception):
    """The client went away before the response was ready; its request was aborted."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=error.info).model_dump()
    return JSONResponse(body, status_code=error.status_code, headers=headers)


def _describe_validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"Malformed JSON body: {first.get('ctx', {}).get('error', '')}".strip())
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members (e.g. prompt's four shapes) appear as extra loc parts; keep the field name.
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return bad_request(f"{where}: {first.get('msg', 'invalid value')}", param=param)


def install_exception_handlers(app: FastAPI) -> None:
    """Map every exception a route can raise to the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        message = str(exc) or "The server is at its queue limit; retry later."
        return error_response(APIError(503, message, code="queue_full"))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        message = str(exc) or "The engine has died and cannot serve requests."
        return error_response(APIError(503, message, code="engine_dead"))

    @app.exception_handler(RequestError)
    async def _request_failed(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(APIError(500, f"The request failed in the engine: {exc}"))

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return error_response(APIError(CLIENT_CLOSED_REQUEST, "Client closed the request."))

    app.add_middleware(UnexpectedErrorMiddleware)


class UnexpectedErrorMiddleware:
    """Turns an unhandled exception into a 500 error body and keeps the connection usable.

    (Starlette's own `Exception` handler answers too, but then re-raises, so uvicorn logs the
    error a second time and drops the connection.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("Unexpected error serving %s %s", scope["method"], scope["path"])
            if started:  # mid-stream: nothing sensible can be sent any more
                raise
            error = APIError(500, "Internal server error.", code="internal_error")
            await error_response(error)(scope, receive, send)
