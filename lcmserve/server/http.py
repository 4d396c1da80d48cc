"""What every HTTP route shares: the server state, the API key, error bodies, and the generation flow.

The flow of a generation route is written once here: check readiness, queue the engine request
with the route's deadline, watch for the HTTP client leaving, then either wait and encode the
images or stream server-sent events as the request runs. Every error leaves as
``{"error": {"type", "message", "param"}}`` with the status of lcmserve/server/errors.py.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcmserve.engine.request import GenerationRequest
from lcmserve.errors import AuthError, InvalidInputError, LCMServeError, NotFoundError, UnavailableError
from lcmserve.server import protocol as p
from lcmserve.server.client import PREVIEW_JPEG_QUALITY, EngineClient, Generation, StepEvent, encode_image
from lcmserve.server.config import ServerConfig
from lcmserve.server.errors import classify, error_body, error_headers, http_status
from lcmserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.1
# The HTTP status of a request whose client went away before its images were ready (nginx's).
CLIENT_CLOSED = 499
# A number longer than this fits no field of any request (the widest, seed, has 10 digits): it
# is handed to validation as a stand-in that fails naming its field, and is never converted.
MAX_NUMBER_DIGITS = 64
_ERRORS = {401: ("unauthorized", "Authorization: Bearer <key> missing or wrong"),
           404: ("not_found", "an adapter the request names is not loaded"),
           413: ("invalid_request", "body over max_body_bytes"), 422: ("invalid_request", "a value is invalid"),
           429: ("overloaded", "queue full; see Retry-After"), 503: ("unavailable", "starting or draining"),
           504: ("deadline_exceeded", "timeout_s (or the server's request_timeout_s) passed in the queue")}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": p.ErrorBody, "description": f"{kind}: {text}"} for status, (kind, text) in _ERRORS.items()}
_STREAM_END = object()
Events = Iterable[tuple[str, Any]]  # (server-sent event name, JSON payload) pairs


# 1. the server state and the API key ------------------------------------------------------------
@dataclass(frozen=True)
class ServerState:
    """What the routes serve: the engine client, the server's config and its metrics (``app.state.server``)."""

    client: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    created: int  # when the app was made: the model card's ``created``


def server_state(request: Request) -> ServerState:
    return request.app.state.server


bearer = HTTPBearer(auto_error=False, description="the server's API key, when one is set")


def key_error(api_key: str | None, authorization: str | None) -> AuthError | None:
    """The 401 of a request whose ``Authorization`` header does not carry ``api_key`` (None: no key set)."""
    if api_key is None:
        return None
    scheme, _, token = (authorization or "").strip().partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    if hmac.compare_digest(given, api_key.encode()):
        return None
    return AuthError("missing or wrong API key: send the header 'Authorization: Bearer <key>'", param="Authorization")


async def require_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """The key check of a route, for its OpenAPI security entry; AuthGateMiddleware has run it before the body."""
    error = key_error(server_state(request).config.api_key, request.headers.get("authorization"))
    if error is not None:
        raise error


async def require_key_if_asked(request: Request,
                               credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    if server_state(request).config.auth_metrics:
        await require_key(request, credentials)


# 2. errors: every one leaves in the same body shape ----------------------------------------------
def _printable(text: str | None) -> str | None:
    """Text a JSON response can carry: a lone surrogate the client sent (in a field name) is escaped."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(error: LCMServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(error)
    body["error"].update(message=_printable(body["error"]["message"]), param=_printable(body["error"]["param"]))
    return JSONResponse(body, status_code=http_status(error), headers={**error_headers(error), **(headers or {})})


class _LongNumber:
    """A JSON number too long to be any field's value: no field's type accepts it, so validation names the field."""

    def __init__(self, text: str) -> None:
        self.length = len(text)

    def __repr__(self) -> str:
        return f"<a number of {self.length} characters>"


def _parse_int(text: str) -> int | _LongNumber:
    return _LongNumber(text) if len(text) > MAX_NUMBER_DIGITS else int(text)


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON, where every way it can fail is a JSONDecodeError (FastAPI's 422 naming ``body``).

    Stricter than ``json.loads`` on bytes: UTF-8 only (RFC 8259, section 8.1), no nesting that
    exhausts the recursion limit, and a number of hundreds of digits is never converted (CPython
    refuses, or spends quadratic time on, long digit strings).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 (byte {exc.start} cannot be decoded)", "", exc.start) \
            from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise json.JSONDecodeError("the body nests arrays or objects too deeply", text, 0) from None


class _JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class JSONBodyRoute(APIRoute):
    """An APIRoute whose body parse errors are 422s (``parse_json_body``), not FastAPI's generic 400."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parse_strictly(request: Request):
            return await handler(_JSONBodyRequest(request.scope, request.receive))

        return parse_strictly


def validation_error(exc: RequestValidationError) -> InvalidInputError:
    """FastAPI/pydantic's first complaint as one InvalidInputError naming the field."""
    errors = list(exc.errors())
    if not errors:
        return InvalidInputError("the request body is invalid", param="body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())[1:]]
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at character {loc[0]}" if loc else ""
        return InvalidInputError(f"body is not valid JSON ({reason}{where})", param="body")
    param = ".".join(loc) or "body"
    if kind == "extra_forbidden":
        message = f"{param} is not a field of this request (check the spelling; the schema is at /docs)"
    elif param == "body" and kind in ("model_attributes_type", "dict_type", "model_type"):
        message = "body must be a JSON object (and the request needs Content-Type: application/json)"
    elif kind == "missing":
        message = f"{param} is required"
    else:
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        message = f"{param}: {first.get('msg', 'invalid value')}; got {shown}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return InvalidInputError(message, param=param)


async def _on_lcmserve_error(request: Request, exc: LCMServeError) -> JSONResponse:
    if isinstance(exc, AuthError):
        server_state(request).metrics.on_failure(exc.type)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    server_state(request).metrics.on_failure(InvalidInputError.type)
    return error_response(validation_error(exc))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    body = {"error": {"type": kind, "message": f"{request.method} {request.url.path}: {exc.detail}", "param": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


EXCEPTION_HANDLERS = {LCMServeError: _on_lcmserve_error, RequestValidationError: _on_validation_error,
                      StarletteHTTPException: _on_http_error}


def not_ready_error(client: EngineClient) -> UnavailableError:
    state = client.batcher.stats().state
    doing = "warming up" if state in ("new", "running") else state
    return UnavailableError(f"the server is {doing} and takes no generation requests now; retry shortly "
                            "or on another replica")


def _check_ready(state: ServerState) -> None:
    if not state.client.ready:
        state.metrics.on_failure(UnavailableError.type)
        raise not_ready_error(state.client)


def _guard(handler):
    """Route errors that are not LCMServeErrors become a logged 500 in the same body shape."""
    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        state: ServerState = kwargs["state"]
        try:
            return await handler(*args, **kwargs)
        except LCMServeError as exc:
            if isinstance(exc, (InvalidInputError, NotFoundError)):  # the batcher counts the rest itself
                state.metrics.on_failure(exc.type)
            return error_response(exc)
        except Exception as exc:
            logger.exception("unexpected error in %s", handler.__name__)
            error = classify(exc)
            state.metrics.on_failure(error.type)
            return error_response(error)

    return wrapped


def generation_route(router: APIRouter, path: str, ok: dict[str, Any], **kwargs: Any):
    """Register a POST generation route: API key required, its errors documented and answered in one shape.

    The handler takes the server state as a keyword argument named ``state`` (``Depends(server_state)``).
    """
    def register(handler):
        router.post(path, dependencies=[Depends(require_key)], responses={**ERROR_RESPONSES, 200: ok},
                    **kwargs)(_guard(handler))
        return handler

    return register


# 3. the generation flow, written once ----------------------------------------------------------------
def encode_b64(generation: Generation, fmt: str) -> list[str]:
    return [base64.b64encode(encode_image(img, fmt)).decode("ascii") for img in generation.images]


def preview_b64(image) -> str:
    return base64.b64encode(encode_image(image, "jpeg", quality=PREVIEW_JPEG_QUALITY)).decode("ascii")


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request) -> AsyncIterator[threading.Event]:
    """A flag set once the HTTP client goes away; the batcher polls ``flag.is_set`` from its thread."""
    gone = threading.Event()

    async def poll() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        gone.set()

    task = asyncio.create_task(poll())
    try:
        yield gone
    finally:
        task.cancel()


async def wait_for_images(request: Request, state: ServerState, engine_request: GenerationRequest,
                          timeout_s: float | None) -> Generation | None:
    """Queue one request and wait for it; None when the HTTP client went away before its images were ready.

    ``timeout_s`` (None: the server's request_timeout_s) counts from here, queue time included.
    """
    _check_ready(state)
    async with _watch_disconnect(request) as gone:
        try:
            return await state.client.generate(engine_request, timeout_s=timeout_s, is_cancelled=gone.is_set)
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            if gone.is_set():
                return None
            raise


def _sse(event: str, data: Any) -> bytes:
    """One server-sent event (text/event-stream): its name and a one-line JSON payload."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_events(state: ServerState, engine_request: GenerationRequest, timeout_s: float | None, *, route: str,
                  step_events: Callable[[StepEvent], Events], final_events: Callable[[Generation], Events],
                  first: Events = (), previews: bool = True,
                  preview_steps: Collection[int] | None = None) -> StreamingResponse:
    """Queue one request and answer with server-sent events while it runs.

    ``first`` are (event, data) pairs sent at once; ``step_events(StepEvent)`` and
    ``final_events(Generation)`` (both run in a worker thread) give the pairs to send as the request
    goes; an error after the status line is the stream's last event, ``error`` with the usual error
    body. A client that leaves frees the request's queued rows. Previews are decoded only at
    ``preview_steps`` when given.
    """
    _check_ready(state)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()  # the HTTP client went away: the batcher drops the rows still queued

    def put(item) -> None:  # from the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, item)

    future = state.client.submit(engine_request, deadline=None if timeout_s is None else time.monotonic() + timeout_s,
                             is_cancelled=gone.is_set, on_step=put, previews=previews, preview_steps=preview_steps)
    future.add_done_callback(lambda _f: put(_STREAM_END))

    async def stream():
        try:
            for name, data in first:
                yield _sse(name, data)
            while (item := await events.get()) is not _STREAM_END:
                for name, data in await asyncio.to_thread(step_events, item):
                    yield _sse(name, data)
            for name, data in await _final(state, future, final_events, route):
                yield _sse(name, data)
        finally:
            if not future.done():  # the client left mid-stream
                gone.set()
                future.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _final(state: ServerState, future: concurrent.futures.Future, final_events: Callable[[Generation], Events],
                 route: str) -> Events:
    """The stream's last events: ``final_events`` of the finished request, or its error."""
    try:
        generation = future.result()
    except Exception as exc:  # noqa: BLE001 (the status line is sent: every error goes in the stream)
        error = exc if isinstance(exc, LCMServeError) else classify(exc)
        if not isinstance(exc, LCMServeError):
            logger.error("unexpected error in %s: %r", route, exc)
            state.metrics.on_failure(error.type)
        return [("error", error_body(error))]
    return await asyncio.to_thread(final_events, generation)


__all__ = ["CLIENT_CLOSED", "ERROR_RESPONSES", "EXCEPTION_HANDLERS", "JSONBodyRoute", "ServerState", "encode_b64",
           "error_response", "generation_route", "key_error", "not_ready_error", "parse_json_body", "preview_b64",
           "require_key",
           "require_key_if_asked", "server_state", "stream_events", "validation_error", "wait_for_images"]
