"""The REST adapter: lcmserve's own routes, at module level, and the app factory that serves them.

Routes stay thin: checks live in protocol.py (configured limits) and the engine client (every
field), batching in the batcher, and the flow every generation route shares (readiness, queue,
disconnects, events, error bodies) in http.py. The OpenAI-compatible routes are in openai.py;
the playground's page, script and style are files in static/.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from lcmserve import __version__
from lcmserve.errors import InvalidInputError
from lcmserve.models.registry import prompt_guide
from lcmserve.server import openai
from lcmserve.server import protocol as p
from lcmserve.server.client import MEDIA_TYPES, EngineClient, Generation, StepEvent, encode_image
from lcmserve.server.config import ServerConfig
from lcmserve.server.http import (
    CLIENT_CLOSED,
    ERROR_RESPONSES,
    EXCEPTION_HANDLERS,
    JSONBodyRoute,
    ServerState,
    encode_b64,
    error_response,
    generation_route,
    not_ready_error,
    preview_b64,
    require_key,
    require_key_if_asked,
    server_state,
    stream_events,
    wait_for_images,
)
from lcmserve.server.metrics import ServerMetrics
from lcmserve.server.middleware import AuthGateMiddleware, BodyLimitMiddleware, RequestMetricsMiddleware

STATIC = Path(__file__).parent / "static"
RAW_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp", "image/*": "*"}
router = APIRouter(route_class=JSONBodyRoute)  # generation
adapters = APIRouter(route_class=JSONBodyRoute, dependencies=[Depends(require_key)], tags=["adapters"])
operations = APIRouter()


# 1. generation ---------------------------------------------------------------------------------
def _raw_format(accept: str | None) -> str | None:
    """The image format the Accept header asks for first, or None for JSON."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        if media in RAW_FORMATS:
            return RAW_FORMATS[media]
        if media in ("application/json", "*/*", "application/*"):
            return None
    return None


def _response_of(state: ServerState, generation: Generation, images: list[str], fmt: str) -> p.GenerateResponse:
    r = generation.request
    return p.GenerateResponse(
        model=state.client.model_name, output_format=fmt, steps=r.steps, guidance_scale=r.guidance_scale,
        width=r.width, height=r.height, prompt_truncated=r.truncated, batch_sizes=list(generation.batch_sizes),
        images=[p.ImageOut(b64=b, seed=seed) for b, seed in zip(images, generation.seeds)],
        timings=p.Timings(queue_wait_s=generation.queue_wait_s, engine_s=generation.engine_s,
                          total_s=generation.total_s),
    )


@generation_route(router, "/generate", response_model=p.GenerateResponse,
                  ok={"content": {m: {} for m in MEDIA_TYPES.values()},
                      "description": "JSON, or the raw image for Accept: image/*"})
async def generate(body: p.GenerateRequest, request: Request, state: ServerState = Depends(server_state)):
    """Generate images; ``Accept: image/png`` (jpeg, webp) with num_images=1 returns the bytes alone."""
    raw = _raw_format(request.headers.get("accept"))
    if raw is not None and body.num_images != 1:
        raise InvalidInputError.out_of_range(
            "num_images", body.num_images, "1 for a raw image response (or send Accept: application/json)")
    engine_request = p.generate_to_engine(body, state.config, state.client.sampler.model.native_size)
    done = await wait_for_images(request, state, engine_request, p.check_timeout(body.timeout_s, state.config))
    if done is None:
        return Response(status_code=CLIENT_CLOSED)
    fmt = body.output_format if raw in (None, "*") else raw
    if raw is not None:
        return Response(await asyncio.to_thread(encode_image, done.images[0], fmt), media_type=MEDIA_TYPES[fmt],
                        headers={"X-Seed": str(done.seeds[0]), "X-Steps": str(done.request.steps),
                                 "X-Total-S": f"{done.total_s:.4f}"})
    return _response_of(state, done, await asyncio.to_thread(encode_b64, done, fmt), fmt)


@generation_route(router, "/generate/stream", ok={"content": {"text/event-stream": {}}, "description": (
    "server-sent events: `queued` ({step: 0, total_steps}), one `step` per denoising step "
    "({step, total_steps, first_image, num_images, previews: [{seed, b64}]}, JPEG previews of "
    "the images' current estimates unless previews is false), then `result` (the body /generate "
    "returns) or `error` ({error: {type, message, param}})")})
async def generate_stream(body: p.GenerateStreamRequest, state: ServerState = Depends(server_state)):
    """Generate images and stream the progress as server-sent events; a bad request fails before the stream."""
    engine_request = p.generate_to_engine(body, state.config, state.client.sampler.model.native_size)
    timeout_s = p.check_timeout(body.timeout_s, state.config)

    def step_events(event: StepEvent):
        previews = [{"seed": seed, "b64": preview_b64(image)} for image, seed in zip(event.previews or (), event.seeds)]
        return [("step", {"step": event.step, "total_steps": event.total_steps, "first_image": event.first_image,
                          "num_images": event.num_images, "previews": previews})]

    def final_events(done: Generation):
        images = encode_b64(done, body.output_format)
        return [("result", _response_of(state, done, images, body.output_format).model_dump())]

    return stream_events(state, engine_request, timeout_s, route="/generate/stream", step_events=step_events,
                         final_events=final_events, previews=body.previews,
                         first=(("queued", {"step": 0, "total_steps": engine_request.steps}),))


# 2. adapters: LoRAs held beside the model, loaded and removed at run time ------------------------
_ADAPTER_ERRORS = {404: "not_found: no adapter of that name is loaded (the message lists those that are)",
                   409: "conflict: an adapter of that name is loaded already",
                   503: "unavailable: requests using the adapter still ran when the removal stopped waiting"}


def _adapter_errors(*statuses: int) -> dict[int | str, dict]:
    """The documented errors of an adapter route: 401 and ``statuses``, in the one error body."""
    out: dict[int | str, dict] = {401: ERROR_RESPONSES[401]}
    for status in statuses:
        out[status] = ({"model": p.ErrorBody, "description": _ADAPTER_ERRORS[status]} if status in _ADAPTER_ERRORS
                       else ERROR_RESPONSES[status])
    return out


@adapters.get("/v1/adapters", response_model=p.AdapterList, responses=_adapter_errors())
async def list_adapters(state: ServerState = Depends(server_state)) -> p.AdapterList:
    """The LoRA adapters a request may choose by name (its ``adapters`` field)."""
    return p.AdapterList(data=[p.AdapterInfo(**a) for a in state.client.describe_adapters()])


@adapters.post("/v1/adapters", status_code=201, response_model=p.AdapterInfo,
               responses=_adapter_errors(409, 413, 422))
async def load_adapter(body: p.AdapterLoad, state: ServerState = Depends(server_state)) -> p.AdapterInfo:
    """Load a LoRA beside the model; requests may choose it once this returns. A file that is not a LoRA of
    this model's UNet is a 422 naming ``path``; the server goes on serving meanwhile and after."""
    return p.AdapterInfo(**await asyncio.to_thread(state.client.load_adapter, body.name, body.path, body.scale))


@adapters.delete("/v1/adapters/{name}", status_code=204, response_class=Response,
                 responses=_adapter_errors(404, 503))
async def remove_adapter(name: str, state: ServerState = Depends(server_state)) -> Response:
    """Unload an adapter: new requests can no longer choose it; waits for the running ones that use it."""
    await asyncio.to_thread(state.client.remove_adapter, name)
    return Response(status_code=204)


# 3. operations and the playground ----------------------------------------------------------------
@operations.get("/healthz", dependencies=[Depends(require_key_if_asked)], responses={401: ERROR_RESPONSES[401]})
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@operations.get("/readyz", dependencies=[Depends(require_key_if_asked)],
                responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]})
async def readyz(state: ServerState = Depends(server_state)):
    """Readiness: the model is loaded and warmed, and the server is not draining."""
    if not state.client.ready:
        return error_response(not_ready_error(state.client))
    return {"status": "ready", "model": state.client.model_name}


@operations.get("/metrics", dependencies=[Depends(require_key_if_asked)], response_class=Response,
                responses={200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]})
async def metrics_route(state: ServerState = Depends(server_state)) -> Response:
    """Prometheus text exposition."""
    content, content_type = state.metrics.render()
    return Response(content, media_type=content_type)


@operations.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@operations.get("/playground/settings.js", include_in_schema=False)
async def playground_settings(state: ServerState = Depends(server_state)) -> Response:
    """What the page needs of this server, as a script that runs before the page's own: the limits, and for a
    bundled model what its prompts look like (the rest of the model card is GET /v1/models, behind the key)."""
    model = state.client.sampler.model
    guide = prompt_guide(state.client.model_name)
    settings = {"model": state.client.model_name, "max_images": state.config.max_images,
                "guidance_scale": model.default_guidance_scale, "negative_prompt": model.guidance_mode == "cfg",
                "understands": guide.understands if guide else None, "examples": list(guide.examples) if guide else []}
    return Response(f"window.LCMSERVE_PLAYGROUND = {json.dumps(settings)};\n", media_type="text/javascript",
                    headers={"Cache-Control": "no-cache"})


# 4. the app --------------------------------------------------------------------------------------
ROUTERS = (router, adapters, openai.router, operations)


def _keyed_routes(config: ServerConfig) -> list:
    """The routes whose dependencies check the API key: AuthGateMiddleware checks it first, before the body."""
    checks = {require_key} | ({require_key_if_asked} if config.auth_metrics else set())
    return [route for routes in ROUTERS for route in routes.routes
            if any(d.dependency in checks for d in getattr(route, "dependencies", ()))]


def create_app(client: EngineClient, config: ServerConfig, metrics: ServerMetrics) -> FastAPI:
    """The REST server over ``client``: generation, OpenAI-compatible, health, metrics, playground."""
    app = FastAPI(title="lcmserve", version=__version__, exception_handlers=EXCEPTION_HANDLERS,
                  description="Latent Consistency Model text-to-image in 1-8 steps. Errors: "
                              '`{"error": {"type", "message", "param"}}`.')
    app.state.server = ServerState(client, config, metrics, created=int(time.time()))
    for routes in ROUTERS:
        app.include_router(routes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # middleware, innermost first
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes,
                       read_timeout_s=config.read_timeout_s, metrics=metrics)
    app.add_middleware(AuthGateMiddleware, api_key=config.api_key, keyed_routes=_keyed_routes(config),
                       metrics=metrics)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["Retry-After", "X-Seed", "X-Steps", "X-Total-S"])
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


__all__ = ["ROUTERS", "adapters", "create_app", "operations", "router"]
