"""The OpenAI-compatible routes: ``POST /v1/images/generations`` (images.generate) and ``GET /v1/models``.

The same flow as lcmserve's own routes (http.py), in OpenAI's request and response shapes,
including its image-generation streaming events.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from lcmserve.engine.request import GenerationRequest
from lcmserve.server import protocol as p
from lcmserve.server.client import Generation, StepEvent
from lcmserve.server.http import (
    CLIENT_CLOSED,
    ERROR_RESPONSES,
    JSONBodyRoute,
    ServerState,
    encode_b64,
    generation_route,
    preview_b64,
    require_key,
    server_state,
    stream_events,
    wait_for_images,
)

router = APIRouter(route_class=JSONBodyRoute)
# fields every OpenAI image event carries that this server has one answer to
_FIXED = {"background": "opaque", "quality": "auto"}


@generation_route(router, "/v1/images/generations", response_model=p.OpenAIImagesResponse, ok={
    "content": {"application/json": {}, "text/event-stream": {}}, "description": (
        "the images; with stream=true, OpenAI's image-generation events instead: up to partial_images "
        "`image_generation.partial_image` events per image (JPEG previews of intermediate steps), then "
        "one `image_generation.completed` per image; lcmserve adds image_index and seed to each")})
async def openai_images(body: p.OpenAIImageRequest, request: Request, state: ServerState = Depends(server_state)):
    """OpenAI-compatible image generation (``response_format`` b64_json only; ``stream`` and
    ``partial_images`` as OpenAI's image models take them)."""
    engine_request = p.openai_to_engine(body, state.config, state.client.model_name, state.client.sampler.limits,
                                        state.client.sampler.model.native_size)
    timeout_s = p.check_timeout(body.timeout_s, state.config)
    if body.stream:
        return _stream(state, body, engine_request, timeout_s)
    done = await wait_for_images(request, state, engine_request, timeout_s)
    if done is None:
        return Response(status_code=CLIENT_CLOSED)
    images = await asyncio.to_thread(encode_b64, done, body.output_format)
    return p.OpenAIImagesResponse(created=int(time.time()), data=[
        p.OpenAIImage(b64_json=b, seed=seed) for b, seed in zip(images, done.seeds)])


def _stream(state: ServerState, body: p.OpenAIImageRequest, engine_request: GenerationRequest,
            timeout_s: float | None) -> StreamingResponse:
    """OpenAI's streaming events: partial images at evenly spread steps, then each completed image."""
    partial_steps = p.partial_image_steps(engine_request.steps, body.partial_images)
    sent: dict[int, int] = {}  # image index -> partial images sent

    def step_events(event: StepEvent):
        out = []
        for k, (image, seed) in enumerate(zip(event.previews or (), event.seeds)):
            index = event.first_image + k
            out.append(("image_generation.partial_image", {
                "type": "image_generation.partial_image", "b64_json": preview_b64(image), "output_format": "jpeg",
                "partial_image_index": sent.get(index, 0), "created_at": int(time.time()),
                "size": f"{image.shape[-1]}x{image.shape[-2]}", "image_index": index, "seed": seed, **_FIXED}))
            sent[index] = sent.get(index, 0) + 1
        return out

    def final_events(done: Generation):
        r = done.request
        return [("image_generation.completed", {
            "type": "image_generation.completed", "b64_json": b64, "output_format": body.output_format,
            "created_at": int(time.time()), "size": f"{r.width}x{r.height}", "image_index": index,
            "seed": seed, **_FIXED}) for index, (b64, seed) in
            enumerate(zip(encode_b64(done, body.output_format), done.seeds))]

    # previews are decoded only at the steps whose partial images are sent
    return stream_events(state, engine_request, timeout_s, route="/v1/images/generations", step_events=step_events,
                         final_events=final_events, previews=bool(partial_steps), preview_steps=partial_steps)


@router.get("/v1/models", response_model=p.ModelList, dependencies=[Depends(require_key)],
            responses={401: ERROR_RESPONSES[401]})
async def models(state: ServerState = Depends(server_state)) -> p.ModelList:
    """The served model, in OpenAI's list shape; like OpenAI's, it takes the API key when the server has one."""
    return p.ModelList(data=[p.ModelCard(created=state.created, **state.client.model_info())])


__all__ = ["router"]
