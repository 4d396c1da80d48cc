"""The REST wire format: request and response schemas, and their translation to GenerationRequest.

Schemas are strict (no "4" for 4) and forbid unknown fields, so a typo fails loudly. Bounds
that do not depend on the server's config sit in the schema (and so in the OpenAPI docs);
the configured limits (prompt length, images per request, pixels) and the model's own size
range are checked in ``check_limits``, which gRPC shares, with errors that name the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lcmserve.engine.request import (
    MAX_ADAPTER_SCALE, MAX_ADAPTERS, MAX_GUIDANCE, MAX_SEED, MAX_STEPS, MIN_STEPS, GenerationRequest, Limits,
    check_prompt,
)
from lcmserve.errors import InvalidInputError
from lcmserve.server.config import ServerConfig

OutputFormat = Literal["png", "jpeg", "webp"]
# A deadline shorter than this is below the time a request takes to reach the engine at all.
MIN_TIMEOUT_S = 0.1
MAX_TIMEOUT_S = 3600.0


def _timeout_field():
    return Field(None, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S, description=(
        "deadline in seconds from arrival, queue time included (at most the server's request_timeout_s); "
        "a request still queued at it gets 504. null: the server's request_timeout_s"))
_SIZE = re.compile(r"^\s*(\d{1,6})\s*x\s*(\d{1,6})\s*$")


NEGATIVE_PROMPT_DOC = ("what guidance steers away from, in place of the empty prompt (at most max_prompt_chars); "
                       "only for a model with classifier-free guidance (a base model with an LCM-LoRA), and only "
                       "with guidance_scale > 1")
GUIDANCE_DOC = ("guidance scale w; null: the model's default (8.0 for a distilled LCM, 1.0 for a base model with "
                "an LCM-LoRA, whose useful range is 1-2)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


AdapterScale = Annotated[float, Field(ge=-MAX_ADAPTER_SCALE, le=MAX_ADAPTER_SCALE)]


def _adapters_field():
    return Field(None, max_length=MAX_ADAPTERS, description=(
        f"LoRA adapters loaded beside the model (GET /v1/adapters), name -> scale in [{-MAX_ADAPTER_SCALE:g}, "
        f"{MAX_ADAPTER_SCALE:g}], at most {MAX_ADAPTERS}; rows with different adapters share a batch. An "
        "unknown name is a 404 that lists the loaded ones. null: none"), examples=[{"shifted": 1.0}])


# 1. POST /generate --------------------------------------------------------------------------
class GenerateRequest(_Strict):
    """Images of one prompt; image i uses seed + i."""

    prompt: str = Field(..., description="the text prompt (at most the server's max_prompt_chars)",
                        examples=["a red circle in the top left"])
    num_images: int = Field(1, ge=1, le=64, description="images to generate (at most the server's max_images)")
    steps: int = Field(4, ge=MIN_STEPS, le=MAX_STEPS, description="LCM steps")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description=GUIDANCE_DOC)
    width: int | None = Field(None, ge=8, le=8192, description="pixels, a multiple of 8; null: the model's size")
    height: int | None = Field(None, ge=8, le=8192, description="pixels, a multiple of 8; null: the model's size")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the first image; null: random")
    negative_prompt: str = Field("", description=NEGATIVE_PROMPT_DOC)
    output_format: OutputFormat = Field("png", description="encoding of the returned images")
    timeout_s: float | None = _timeout_field()
    adapters: dict[str, AdapterScale] | None = _adapters_field()


class GenerateStreamRequest(GenerateRequest):
    """A GenerateRequest whose progress streams back as server-sent events."""

    previews: bool = Field(True, description="a JPEG preview of every image with each step event (a decode per "
                                             "step, paid by this request's rows only)")


class ImageOut(BaseModel):
    b64: str = Field(..., description="the encoded image, base64")
    seed: int = Field(..., description="the seed that reproduces this image alone")


class Timings(BaseModel):
    queue_wait_s: float = Field(..., description="arrival to the start of the request's first batch")
    engine_s: float = Field(..., description="engine time of the batches it ran in")
    total_s: float = Field(..., description="arrival to images ready, before encoding")


class GenerateResponse(BaseModel):
    model: str
    images: list[ImageOut]
    output_format: OutputFormat
    steps: int
    guidance_scale: float
    width: int
    height: int
    prompt_truncated: bool = Field(..., description="the prompt was longer than the text encoder takes")
    batch_sizes: list[int]
    timings: Timings


# 2. POST /v1/images/generations (OpenAI-compatible) ---------------------------------------------------------
MAX_PARTIAL_IMAGES = 3  # OpenAI's own limit


class OpenAIImageRequest(_Strict):
    """OpenAI's images.generate; steps, guidance_scale, seed and negative_prompt are lcmserve extensions (extra_body)."""

    prompt: str
    model: str | None = Field(None, description="optional; must name the served model (GET /v1/models)")
    n: int = Field(1, ge=1, le=64, description="images to generate")
    size: str | None = Field(None, description="'WIDTHxHEIGHT', e.g. '64x64'; null: the model's size")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="only b64_json: this server keeps no image store to link to")
    output_format: OutputFormat = "png"
    user: str | None = Field(None, description="accepted and ignored")
    steps: int = Field(4, ge=MIN_STEPS, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description=GUIDANCE_DOC)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    negative_prompt: str = Field("", description=NEGATIVE_PROMPT_DOC)
    timeout_s: float | None = _timeout_field()
    stream: bool = Field(False, description="server-sent events: partial images, then the completed ones")
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES, description=(
        "with stream: JPEG previews per image from intermediate steps, evenly spread (at most steps - 1)"))
    adapters: dict[str, AdapterScale] | None = _adapters_field()


def partial_image_steps(steps: int, partial_images: int) -> frozenset[int]:
    """The denoising steps (1-based) whose previews are sent as partial images: ``partial_images`` of the
    intermediate steps 1..steps-1, evenly spread and ending on the last of them (the final step's preview
    is the finished image itself, sent as ``completed``)."""
    intermediate = steps - 1
    if partial_images <= 0 or intermediate <= 0:
        return frozenset()
    if partial_images >= intermediate:
        return frozenset(range(1, steps))
    return frozenset(round(intermediate * (k + 1) / partial_images) for k in range(partial_images))


class OpenAIImage(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lcmserve"
    # lcmserve's own fields (OpenAI's clients ignore them): what a request to this model may ask for.
    guidance_mode: Literal["embedding", "cfg"] | None = Field(None, description=(
        "embedding: a distilled LCM, w enters as a condition and negative_prompt is refused; cfg: a base model "
        "with an LCM-LoRA, classifier-free guidance above w = 1, negative_prompt accepted"))
    default_guidance_scale: float | None = Field(None, description="the w of a request that gives none")
    native_size: int | None = Field(None, description="the model's native width and height in pixels")
    max_prompt_tokens: int | None = Field(None, description="tokens the text encoder reads, start and end "
                                          "included; a longer prompt is cut (prompt_truncated in the answer)")
    lora: str | None = Field(None, description="the LCM-LoRA fused into the model at load, as the server was "
                             "given it; null when none")
    # how the server runs it (gRPC's ModelInfo has no fields for these)
    backend: str | None = Field(None, description="the engine backend in use: torch, compiled, cuda-graph, onnx "
                                "or tensorrt")
    dtype: str | None = Field(None, description="the model's weights and compute dtype: float32, bfloat16 or float16")
    attention: str | None = Field(None, description="sdpa (torch's attention) or small-head (lcmserve's CPU kernel)")
    backend_reason: str | None = Field(None, description="why this backend, dtype and attention were picked "
                                       "(backend auto); null when they were given")
    adapters: list[str] | None = Field(None, description="the LoRA adapters loaded beside the model, which a "
                                       "request may choose by name (details: GET /v1/adapters)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# 3. /v1/adapters -----------------------------------------------------------------------------------
class AdapterLoad(_Strict):
    """A LoRA to hold beside the model under a name that requests choose it by."""

    name: str = Field(..., description="1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
                      examples=["sketch"])
    path: str = Field(..., description="on the server: a LoRA .safetensors file, its folder, or a bundled LoRA's "
                      "name (diffusers, peft or kohya layouts; UNet layers only)")
    scale: float = Field(1.0, ge=-MAX_ADAPTER_SCALE, le=MAX_ADAPTER_SCALE,
                         description="multiplies every request's scale for this adapter")


class AdapterInfo(BaseModel):
    name: str
    path: str = Field(..., description="as it was given")
    scale: float
    modules: int = Field(..., description="UNet layers it changes")
    ranks: list[int] = Field(..., description="its LoRA ranks")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


# 4. translation and the configured limits ------------------------------------------------------
def check_text(text: str, param: str) -> str:
    """Text the tokenizer can take (the engine's one check: a string, no NUL, valid Unicode), before any
    limit of the server's is applied; gRPC's undecodable bytes are refused as they are parsed (grpc_gate.py)."""
    return check_prompt(text, param)


def check_prompt_length(prompt: str, config: ServerConfig, param: str = "prompt") -> None:
    if len(prompt) > config.max_prompt_chars:
        raise InvalidInputError(
            f"{param} has {len(prompt)} characters; at most max_prompt_chars={config.max_prompt_chars}", param=param)


def check_pixels(param: str, width: int | None, height: int | None, native: int, config: ServerConfig) -> None:
    w, h = width or native, height or native
    if w * h > config.max_pixels:
        raise InvalidInputError(
            f"{param}: {w}x{h} is {w * h} pixels; at most max_pixels={config.max_pixels} per image", param=param)


def check_timeout(timeout_s: float | None, config: ServerConfig) -> float | None:
    """A request's own deadline may be shorter than the server's request_timeout_s, never longer."""
    if timeout_s is not None and timeout_s > config.request_timeout_s:
        raise InvalidInputError.out_of_range(
            "timeout_s", timeout_s,
            f"a number of seconds in [{MIN_TIMEOUT_S}, {config.request_timeout_s}] (the server's request_timeout_s)")
    return timeout_s


def parse_size(size: str | None, limits: Limits) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H), each a multiple of 8 in the model's range; errors name ``size``."""
    if size is None:
        return None, None
    allowed = f"'WIDTHxHEIGHT' with each side a multiple of 8 in [{limits.min_size}, {limits.max_size}]"
    match = _SIZE.match(size)
    if match is None:
        raise InvalidInputError.out_of_range("size", size, allowed)
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if side % 8 or not limits.min_size <= side <= limits.max_size:
            raise InvalidInputError.out_of_range("size", size, allowed)
    return width, height


def check_limits(request: GenerationRequest, config: ServerConfig, native: int, *,
                 images_param: str = "num_images", size_param: str = "width") -> GenerationRequest:
    """The server's configured limits, the same for every route and RPC: prompt lengths, images, pixels.

    ``images_param`` and ``size_param`` name the fields as the caller's wire format spells them.
    """
    for param in ("prompt", "negative_prompt"):
        text = getattr(request, param)
        if isinstance(text, str):  # the engine names a value of another type
            check_text(text, param)
            check_prompt_length(text, config, param)
    if request.num_images > config.max_images:
        raise InvalidInputError.out_of_range(images_param, request.num_images,
                                             f"an integer in [1, {config.max_images}]")
    check_pixels(size_param, request.width, request.height, native, config)
    return request


def generate_to_engine(body: GenerateRequest, config: ServerConfig, native: int) -> GenerationRequest:
    request = GenerationRequest(prompt=body.prompt, num_images=body.num_images, steps=body.steps,
                                guidance_scale=body.guidance_scale, width=body.width, height=body.height,
                                seed=body.seed, negative_prompt=body.negative_prompt, adapters=body.adapters)
    return check_limits(request, config, native)


def openai_to_engine(body: OpenAIImageRequest, config: ServerConfig, model_name: str, limits: Limits,
                     native: int) -> GenerationRequest:
    if body.response_format == "url":
        raise InvalidInputError(
            "response_format 'url' is not supported: this server keeps no image store; use 'b64_json'",
            param="response_format")
    if body.model is not None and body.model != model_name:
        raise InvalidInputError.out_of_range("model", body.model, f"{model_name!r} (see GET /v1/models) or omitted")
    width, height = parse_size(body.size, limits)
    request = GenerationRequest(prompt=body.prompt, num_images=body.n, steps=body.steps,
                                guidance_scale=body.guidance_scale, width=width, height=height, seed=body.seed,
                                negative_prompt=body.negative_prompt, adapters=body.adapters)
    return check_limits(request, config, native, images_param="n", size_param="size")

__all__ = [
    "AdapterInfo", "AdapterList", "AdapterLoad", "ErrorBody", "GenerateRequest", "GenerateResponse", "GenerateStreamRequest", "ImageOut", "ModelCard", "ModelList",
    "OpenAIImage", "OpenAIImageRequest", "OpenAIImagesResponse", "Timings", "check_limits", "check_text", "check_timeout",
    "generate_to_engine", "openai_to_engine", "parse_size", "partial_image_steps",
]
