"""The REST adapter: FastAPI routes that translate JSON to GenerationRequest and back.

Routes stay thin: checks live in protocol.py (configured limits) and the engine client (every
field), batching in the batcher, and every error leaves through ``_error_response`` as
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
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcmserve import __version__
from lcmserve.errors import AuthError, BodyTooLargeError, InvalidInputError, LCMServeError, UnavailableError
from lcmserve.server import protocol as p
from lcmserve.server.client import MEDIA_TYPES, PREVIEW_JPEG_QUALITY, EngineClient, Generation, StepEvent, encode_image
from lcmserve.server.config import ServerConfig
from lcmserve.server.errors import classify, error_body, error_headers, http_status
from lcmserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.1
RAW_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp", "image/*": "*"}
_ERRORS = {401: ("unauthorized", "Authorization: Bearer <key> missing or wrong"),
           413: ("invalid_request", "body over max_body_bytes"), 422: ("invalid_request", "a value is invalid"),
           429: ("overloaded", "queue full; see Retry-After"), 503: ("unavailable", "starting or draining"),
           504: ("deadline_exceeded", "timeout_s (or the server's request_timeout_s) passed in the queue")}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": p.ErrorBody, "description": f"{kind}: {text}"} for status, (kind, text) in _ERRORS.items()}


def _sse(event: str, data: Any) -> bytes:
    """One server-sent event (text/event-stream): its name and a one-line JSON payload."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


_STREAM_END = object()


def _error_response(error: LCMServeError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=http_status(error), headers=error_headers(error))


def _validation_error(exc: RequestValidationError) -> InvalidInputError:
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


# 1. pure ASGI middleware (BaseHTTPMiddleware would break disconnect detection) -----------------------
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
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "unmatched"
                self.metrics.observe_request("http", endpoint, status[0], time.perf_counter() - started)


class BodyLimitMiddleware:
    """Reads at most ``max_body_bytes`` of a body, answers 413 beyond it, then replays it to the app."""

    def __init__(self, app, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        size = int(declared) if declared.isdigit() else 0
        chunks: list[bytes] = []
        while size <= self.limit:
            message = await receive()
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
            return await _error_response(error)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect detection goes to the server

        await self.app(scope, replay, send)


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


def _raw_format(accept: str | None) -> str | None:
    """The image format the Accept header asks for first, or None for JSON."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        if media in RAW_FORMATS:
            return RAW_FORMATS[media]
        if media in ("application/json", "*/*", "application/*"):
            return None
    return None


# 2. the app --------------------------------------------------------------------------------------
def create_app(client: EngineClient, config: ServerConfig, metrics: ServerMetrics) -> FastAPI:
    """The REST server over ``client``: generation, OpenAI-compatible, health, metrics, playground."""
    app = FastAPI(title="lcmserve", version=__version__,
                  description="Latent Consistency Model text-to-image in 1-8 steps. Errors: "
                              '`{"error": {"type", "message", "param"}}`.')
    app.state.client, app.state.config, app.state.metrics = client, config, metrics
    created = int(time.time())
    model = client.sampler.model
    bearer = HTTPBearer(auto_error=False, description="the server's API key, when one is set")

    # 2.1 errors: every one leaves in the same body shape
    @app.exception_handler(LCMServeError)
    async def _on_lcmserve_error(request: Request, exc: LCMServeError) -> JSONResponse:
        if isinstance(exc, AuthError):
            metrics.on_failure(exc.type)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.on_failure(InvalidInputError.type)
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        body = {"error": {"type": kind, "message": f"{request.method} {request.url.path}: {exc.detail}",
                          "param": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    # 2.2 dependencies
    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.api_key is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, config.api_key.encode()):
            raise AuthError("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                            param="Authorization")

    async def require_key_if_asked(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.auth_metrics:
            await require_key(credentials)

    def not_ready_error() -> UnavailableError:
        state = client.batcher.stats().state
        doing = "warming up" if state in ("new", "running") else state
        return UnavailableError(f"the server is {doing} and takes no generation requests now; retry shortly "
                                "or on another replica")

    async def run(request: Request, engine_request, timeout_s: float | None) -> Generation | None:
        """Queue one request; None when the HTTP client went away before its images were ready.

        ``timeout_s`` (None: the server's request_timeout_s) counts from here, queue time included.
        """
        if not client.ready:
            metrics.on_failure(UnavailableError.type)
            raise not_ready_error()
        async with _watch_disconnect(request) as gone:
            try:
                return await client.generate(engine_request, timeout_s=timeout_s, is_cancelled=gone.is_set)
            except (asyncio.CancelledError, concurrent.futures.CancelledError):
                if gone.is_set():
                    return None
                raise

    def encode_now(generation: Generation, fmt: str) -> list[str]:
        return [base64.b64encode(encode_image(img, fmt)).decode("ascii") for img in generation.images]

    async def encode(generation: Generation, fmt: str) -> list[str]:
        return await asyncio.to_thread(encode_now, generation, fmt)

    def jpeg_b64(image) -> str:
        return base64.b64encode(encode_image(image, "jpeg", quality=PREVIEW_JPEG_QUALITY)).decode("ascii")

    def guard(handler):
        """Route errors that are not LCMServeErrors become a logged 500 in the same body shape."""
        @functools.wraps(handler)
        async def wrapped(*args, **kwargs):
            try:
                return await handler(*args, **kwargs)
            except LCMServeError as exc:
                if isinstance(exc, InvalidInputError):  # the batcher counts the rest itself
                    metrics.on_failure(exc.type)
                return _error_response(exc)
            except Exception as exc:
                logger.exception("unexpected error in %s", handler.__name__)
                error = classify(exc)
                metrics.on_failure(error.type)
                return _error_response(error)

        return wrapped

    # 2.3 generation routes
    @app.post("/generate", response_model=p.GenerateResponse, dependencies=[Depends(require_key)],
              responses={**ERROR_RESPONSES, 200: {"content": {m: {} for m in MEDIA_TYPES.values()},
                                                  "description": "JSON, or the raw image for Accept: image/*"}})
    @guard
    async def generate(body: p.GenerateRequest, request: Request):
        """Generate images; ``Accept: image/png`` (jpeg, webp) with num_images=1 returns the bytes alone."""
        raw = _raw_format(request.headers.get("accept"))
        if raw is not None and body.num_images != 1:
            raise InvalidInputError.out_of_range(
                "num_images", body.num_images, "1 for a raw image response (or send Accept: application/json)")
        engine_request = p.generate_to_engine(body, config, model.native_size)
        generation = await run(request, engine_request, p.check_timeout(body.timeout_s, config))
        if generation is None:
            return Response(status_code=499)
        fmt = body.output_format if raw in (None, "*") else raw
        images = await encode(generation, fmt)
        if raw is not None:
            return Response(base64.b64decode(images[0]), media_type=MEDIA_TYPES[fmt], headers={
                "X-Seed": str(generation.seeds[0]), "X-Steps": str(generation.request.steps),
                "X-Total-S": f"{generation.total_s:.4f}"})
        return response_of(generation, images, fmt)

    def response_of(generation: Generation, images: list[str], fmt: str) -> p.GenerateResponse:
        r = generation.request
        return p.GenerateResponse(
            model=client.model_name, output_format=fmt, steps=r.steps, guidance_scale=r.guidance_scale,
            width=r.width, height=r.height, prompt_truncated=r.truncated, batch_sizes=list(generation.batch_sizes),
            images=[p.ImageOut(b64=b, seed=s) for b, s in zip(images, generation.seeds)],
            timings=p.Timings(queue_wait_s=generation.queue_wait_s, engine_s=generation.engine_s,
                              total_s=generation.total_s),
        )

    def stream_response(engine_request, timeout_s: float | None, previews: bool, step_events, final_events,
                        route: str, first: tuple = (), preview_steps=None) -> StreamingResponse:
        """Queue one request and answer with server-sent events while it runs.

        ``first`` are (event, data) pairs sent at once; ``step_events(StepEvent)`` and
        ``final_events(Generation)`` (both run in a worker thread) give the pairs to send as the request
        goes; an error after the status line is the stream's last event, ``error`` with the usual error
        body. A client that leaves frees the request's queued rows."""
        if not client.ready:
            metrics.on_failure(UnavailableError.type)
            raise not_ready_error()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # the HTTP client went away: the batcher drops the rows still queued

        def put(item) -> None:  # from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, item)

        future = client.submit(engine_request, deadline=None if timeout_s is None else time.monotonic() + timeout_s,
                               is_cancelled=gone.is_set, on_step=put, previews=previews, preview_steps=preview_steps)
        future.add_done_callback(lambda _f: put(_STREAM_END))

        async def stream():
            try:
                for name, data in first:
                    yield _sse(name, data)
                while (item := await events.get()) is not _STREAM_END:
                    for name, data in await asyncio.to_thread(step_events, item):
                        yield _sse(name, data)
                try:
                    generation = future.result()
                except Exception as exc:  # noqa: BLE001 (the status line is sent: every error goes in the stream)
                    error = exc if isinstance(exc, LCMServeError) else classify(exc)
                    if not isinstance(exc, LCMServeError):
                        logger.error("unexpected error in %s: %r", route, exc)
                        metrics.on_failure(error.type)
                    yield _sse("error", error_body(error))
                    return
                for name, data in await asyncio.to_thread(final_events, generation):
                    yield _sse(name, data)
            finally:
                if not future.done():  # the client left mid-stream
                    gone.set()
                    future.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/generate/stream", dependencies=[Depends(require_key)],
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}, "description": (
                  "server-sent events: `queued` ({step: 0, total_steps}), one `step` per denoising step "
                  "({step, total_steps, first_image, num_images, previews: [{seed, b64}]}, JPEG previews of "
                  "the images' current estimates unless previews is false), then `result` (the body /generate "
                  "returns) or `error` ({error: {type, message, param}})")}})
    @guard
    async def generate_stream(body: p.GenerateStreamRequest, request: Request):
        """Generate images and stream the progress as server-sent events; a bad request fails before the stream."""
        engine_request = p.generate_to_engine(body, config, model.native_size)
        timeout_s = p.check_timeout(body.timeout_s, config)

        def step_events(event: StepEvent):
            previews = [{"seed": seed, "b64": jpeg_b64(image)} for image, seed in zip(event.previews or (), event.seeds)]
            return [("step", {"step": event.step, "total_steps": event.total_steps, "first_image": event.first_image,
                              "num_images": event.num_images, "previews": previews})]

        def final_events(generation: Generation):
            images = encode_now(generation, body.output_format)
            return [("result", response_of(generation, images, body.output_format).model_dump())]

        return stream_response(engine_request, timeout_s, body.previews, step_events, final_events,
                               "/generate/stream", first=(("queued", {"step": 0, "total_steps": engine_request.steps}),))

    @app.post("/v1/images/generations", response_model=p.OpenAIImagesResponse, dependencies=[Depends(require_key)],
              responses={**ERROR_RESPONSES, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                                                  "description": (
                  "the images; with stream=true, OpenAI's image-generation events instead: up to partial_images "
                  "`image_generation.partial_image` events per image (JPEG previews of intermediate steps), then "
                  "one `image_generation.completed` per image; lcmserve adds image_index and seed to each")}})
    @guard
    async def openai_images(body: p.OpenAIImageRequest, request: Request):
        """OpenAI-compatible image generation (``response_format`` b64_json only; ``stream`` and
        ``partial_images`` as OpenAI's image models take them)."""
        engine_request = p.openai_to_engine(body, config, client.model_name, client.sampler.limits,
                                            model.native_size)
        timeout_s = p.check_timeout(body.timeout_s, config)
        if body.stream:
            return openai_stream(body, engine_request, timeout_s)
        generation = await run(request, engine_request, timeout_s)
        if generation is None:
            return Response(status_code=499)
        images = await encode(generation, body.output_format)
        return p.OpenAIImagesResponse(created=int(time.time()), data=[
            p.OpenAIImage(b64_json=b, seed=s) for b, s in zip(images, generation.seeds)])

    def openai_stream(body: p.OpenAIImageRequest, engine_request, timeout_s: float | None) -> StreamingResponse:
        partial_steps = p.partial_image_steps(engine_request.steps, body.partial_images)
        common = {"background": "opaque", "quality": "auto"}
        sent: dict[int, int] = {}  # image index -> partial images sent

        def step_events(event: StepEvent):
            if not event.previews:
                return []
            out = []
            for k, (image, seed) in enumerate(zip(event.previews, event.seeds)):
                index = event.first_image + k
                out.append(("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": jpeg_b64(image), "output_format": "jpeg",
                    "partial_image_index": sent.get(index, 0), "created_at": int(time.time()),
                    "size": f"{image.shape[-1]}x{image.shape[-2]}", "image_index": index, "seed": seed, **common}))
                sent[index] = sent.get(index, 0) + 1
            return out

        def final_events(generation: Generation):
            r = generation.request
            return [("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": b64, "output_format": body.output_format,
                "created_at": int(time.time()), "size": f"{r.width}x{r.height}", "image_index": index,
                "seed": seed, **common}) for index, (b64, seed) in
                enumerate(zip(encode_now(generation, body.output_format), generation.seeds))]

        return stream_response(engine_request, timeout_s, bool(partial_steps), step_events, final_events,
                               "/v1/images/generations", preview_steps=partial_steps)  # decoded only when sent

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> p.ModelList:
        """The served model, in OpenAI's list shape."""
        return p.ModelList(data=[p.ModelCard(created=created, **client.model_info())])

    # 2.4 operations
    @app.get("/healthz", dependencies=[Depends(require_key_if_asked)], responses={401: ERROR_RESPONSES[401]})
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", dependencies=[Depends(require_key_if_asked)],
             responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]})
    async def readyz():
        """Readiness: the model is loaded and warmed, and the server is not draining."""
        if not client.ready:
            return _error_response(not_ready_error())
        return {"status": "ready", "model": client.model_name}

    @app.get("/metrics", dependencies=[Depends(require_key_if_asked)], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]})
    async def metrics_route() -> Response:
        """Prometheus text exposition."""
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        model_json = json.dumps(client.model_name).replace("<", "\\u003c")  # no </script> from a model name
        return HTMLResponse(PLAYGROUND_HTML.replace("{{MODEL}}", model_json)
                            .replace("{{MAX_IMAGES}}", str(config.max_images))
                            .replace("{{GUIDANCE}}", f"{model.default_guidance_scale:g}")
                            .replace("{{NEGATIVE}}", NEGATIVE_PROMPT_HTML if model.guidance_mode == "cfg" else ""))

    # 2.5 middleware, innermost first
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes, metrics=metrics)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["Retry-After", "X-Seed", "X-Steps", "X-Total-S"])
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


# 3. the playground: plain HTML and JS, no CDN ------------------------------------------------------------
# Only a model with classifier-free guidance takes a negative prompt; the others would refuse it.
NEGATIVE_PROMPT_HTML = """ <label for="negative">negative prompt</label>
 <input id="negative" placeholder="what guidance steers away from (at guidance above 1)"><br>
"""
PLAYGROUND_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lcmserve playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem;color:#222}
 label{display:inline-block;margin:.3rem 1rem .3rem 0} input{font:inherit}
 #prompt,#negative{width:100%;box-sizing:border-box;padding:.4rem} button{font:inherit;padding:.4rem 1.2rem}
 #grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:.6rem;margin-top:1rem}
 #grid figure{margin:0} #grid img{width:100%;image-rendering:pixelated;border:1px solid #ccc}
 #grid figcaption{font-size:.8rem;color:#555} #status{margin-left:1rem;color:#555}
 #error{color:#b00020;margin-top:.6rem} #error:empty{display:none}
</style></head><body>
<h1>lcmserve playground</h1><p>Model: <code id="model"></code> &middot; <a href="/docs">API docs</a></p>
<form id="form">
 <label for="prompt">prompt</label>
 <input id="prompt" placeholder="a red circle at the top left" value="a red circle at the top left" required><br>
{{NEGATIVE}} <label>steps <input id="steps" type="number" min="1" max="8" step="1" value="4" required></label>
 <label>guidance <input id="guidance" type="number" min="0" max="50" step="0.5" value="{{GUIDANCE}}" required></label>
 <label>seed <input id="seed" type="number" min="0" max="9007199254740991" step="1" placeholder="random"></label>
 <label>images <input id="n" type="number" min="1" max="{{MAX_IMAGES}}" step="1" value="1" required></label>
 <label>API key <input id="key" type="password" placeholder="if the server has one" autocomplete="off"></label><br>
 <button id="go" type="submit">Generate</button><span id="status" aria-live="polite"></span>
</form>
<div id="error" role="alert"></div>
<div id="grid" aria-live="polite"></div>
<script>
const $ = (id) => document.getElementById(id);
$("model").textContent = {{MODEL}};

async function errorText(response) {
  // every lcmserve error is {"error": {type, message, param}}; a proxy in between may send anything
  try {
    const error = (await response.json()).error;
    return response.status + " " + error.type + ": " + error.message;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

function figure(src, alt, text) {
  const element = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  const caption = document.createElement("figcaption");
  caption.textContent = text;
  element.append(img, caption);
  return element;
}

function show(data) {
  $("grid").replaceChildren(...data.images.map((image) => figure(
    "data:image/" + data.output_format + ";base64," + image.b64, $("prompt").value + " (seed " + image.seed + ")",
    "seed " + image.seed + ", " + data.steps + " steps, w " + data.guidance_scale)));
}

function showPreviews(step) {
  // the images' current estimates, low-quality JPEGs, while the request runs
  $("grid").replaceChildren(...step.previews.map((preview) => figure(
    "data:image/jpeg;base64," + preview.b64, "preview of seed " + preview.seed,
    "seed " + preview.seed + ", step " + step.step + " of " + step.total_steps)));
  $("status").textContent = "step " + step.step + " of " + step.total_steps + "...";
  $("grid").dataset.previews = Number($("grid").dataset.previews || 0) + 1;
}

async function* events(response) {
  // server-sent events from a POST (EventSource only GETs): "event: NAME" and "data: JSON" lines, a blank line after
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const fields = {};
      for (const line of buffer.slice(0, end).split("\\n")) {
        const at = line.indexOf(": ");
        fields[line.slice(0, at)] = line.slice(at + 2);
      }
      buffer = buffer.slice(end + 2);
      yield [fields.event, JSON.parse(fields.data)];
    }
  }
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const seed = $("seed").value;
  const body = {prompt: $("prompt").value, steps: Number($("steps").value),
                guidance_scale: Number($("guidance").value), num_images: Number($("n").value),
                seed: seed === "" ? null : Number(seed)};
  if ($("negative") && $("negative").value) body.negative_prompt = $("negative").value;
  const headers = {"Content-Type": "application/json", "Accept": "text/event-stream"};
  if ($("key").value) headers["Authorization"] = "Bearer " + $("key").value;
  $("go").disabled = true; $("error").textContent = ""; $("status").textContent = "generating...";
  try {
    const response = await fetch("/generate/stream", {method: "POST", headers, body: JSON.stringify(body)});
    if (!response.ok) throw new Error(await errorText(response));
    $("grid").dataset.previews = 0;
    let data = null;
    for await (const [name, payload] of events(response)) {
      if (name === "step" && payload.previews.length) showPreviews(payload);
      else if (name === "error") throw new Error(payload.error.type + ": " + payload.error.message);
      else if (name === "result") data = payload;
    }
    if (data === null) throw new Error("the stream ended without a result");
    show(data);
    $("status").textContent = data.images.length + " image(s) in " + data.timings.total_s.toFixed(2) + " s";
  } catch (error) {
    $("status").textContent = "";
    $("error").textContent = error.message;
  } finally { $("go").disabled = false; }
});
</script></body></html>
"""

__all__ = ["PLAYGROUND_HTML", "create_app"]
