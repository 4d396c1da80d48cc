"""Pure ASGI middleware of the REST server (BaseHTTPMiddleware would break disconnect detection).

The order a request meets them, outermost first: request metrics, CORS, the API key (before any
byte of the body is read, so a client without the key gets 401 whatever it sends), then the
body's size and read deadline; the routes see a body that is whole, in time and within size.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from fastapi.routing import APIRoute

from lcmserve.errors import BodyTooLargeError, InvalidInputError
from lcmserve.server.errors import RequestTimeoutError
from lcmserve.server.http import error_response, key_error
from lcmserve.server.metrics import ServerMetrics


class RequestMetricsMiddleware:
    """Duration by route template and status, and the in-flight gauge, for every HTTP request."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), ["500"]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        with self.metrics.track_in_flight("http"):
            try:
                await self.app(scope, receive, send_status)
            finally:
                self.metrics.observe_request("http", _endpoint(scope), status[0], time.perf_counter() - started)


def _endpoint(scope) -> str:
    """The route template that answered, the mount path of a mounted app (static files), or "unmatched"."""
    route_path = getattr(scope.get("route"), "path", None)
    if route_path:
        return route_path
    if "app_root_path" in scope:  # set by a Mount: its path is what the root path gained
        return scope.get("root_path", "")[len(scope["app_root_path"]):] or "unmatched"
    return "unmatched"


class AuthGateMiddleware:
    """Answers 401 to a request for a keyed route without the key, before anything reads its body."""

    def __init__(self, app, api_key: str | None, keyed_routes: Sequence[APIRoute], metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.routes, self.metrics = app, api_key, list(keyed_routes), metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.api_key is not None:
            for route in self.routes:
                if scope["method"] not in route.methods or not route.path_regex.match(scope["path"]):
                    continue
                authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                error = key_error(self.api_key, authorization)
                if error is not None:
                    scope["route"] = route  # so that the request metrics name the route
                    self.metrics.on_failure(error.type)
                    return await error_response(error)(scope, receive, send)
                break
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads a whole body, at most ``max_body_bytes`` (413 beyond) within ``read_timeout_s`` of the request's
    start (408 after, and the connection closes), then replays it to the app."""

    def __init__(self, app, max_body_bytes: int, read_timeout_s: float, metrics: ServerMetrics) -> None:
        self.app, self.limit, self.timeout_s, self.metrics = app, max_body_bytes, read_timeout_s, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        size = int(declared) if declared.isdigit() else 0
        chunks: list[bytes] = []
        deadline = time.monotonic() + self.timeout_s
        while size <= self.limit:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                self.metrics.on_failure(RequestTimeoutError.type)
                error = RequestTimeoutError(f"the body did not arrive within read_timeout_s={self.timeout_s}: "
                                            f"{sum(map(len, chunks))} bytes came in time", param="body")
                return await error_response(error, {"Connection": "close"})(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size = sum(map(len, chunks))
            if not message.get("more_body", False):
                break
        if size > self.limit:
            self.metrics.on_failure(InvalidInputError.type)
            error = BodyTooLargeError(
                f"body has {size} bytes or more; at most max_body_bytes={self.limit}", param="body")
            return await error_response(error)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect detection goes to the server

        await self.app(scope, replay, send)


__all__ = ["AuthGateMiddleware", "BodyLimitMiddleware", "RequestMetricsMiddleware"]
