"""The gRPC adapter: ``lcmserve.v1.ImageGeneration`` over the engine client, plus health and reflection.

Thin on purpose: a call becomes a ``GenerationRequest``, goes to ``EngineClient.submit`` with
the call's deadline and cancellation, and its ``Generation`` becomes a response; validation,
batching and the error taxonomy live in the client and in :mod:`lcmserve.server.errors`.

Stubs are generated from ``proto/lcmserve.proto`` with grpcio-tools the first time this
module is imported, into a cache folder keyed by a hash of the proto and the protobuf and
grpcio-tools versions; none are written by hand or committed.

``GenerateStream`` sends one ``STAGE_QUEUED`` progress event when the request is accepted,
one ``STAGE_STEP`` event per denoising step (``EngineClient.submit(..., on_step=...)``), each
with a low-quality JPEG preview of every image's current x0 estimate unless the request sets
``previews = false`` (a decode per step, paid by that request's rows only; the server's
``preview_vae``, e.g. TAESD, makes it cheap), and the
images last. When the server has an API key, the generation RPCs require the metadata
``authorization: Bearer <key>`` (UNAUTHENTICATED otherwise); health and reflection are open.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
import logging
import os
import queue
import shutil
import sys
import tempfile
import time
from concurrent import futures
from concurrent.futures import CancelledError, Future
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lcmserve.engine.cache import default_cache_dir
from lcmserve.engine.request import GenerationRequest
from lcmserve.errors import AuthError, DeadlineExceededError, InvalidInputError, LCMServeError
from lcmserve.server.client import (
    IMAGE_FORMATS,
    MEDIA_TYPES,
    PREVIEW_JPEG_QUALITY,
    EngineClient,
    Generation,
    StepEvent,
    encode_image,
)
from lcmserve.server.errors import classify, error_headers, grpc_code_name
from lcmserve.server.protocol import check_pixels, check_prompt_length

logger = logging.getLogger(__name__)

PROTO_ENV = "LCMSERVE_PROTO"  # path of lcmserve.proto when the package is not run from the repo
_REPO_PROTO = Path(__file__).resolve().parents[2] / "proto" / "lcmserve.proto"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 50051
# 64 images of 2048 px PNGs would not fit, but the public limits stay far below that.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 2**20
# Every call holds a thread while its request waits in the batcher's queue.
DEFAULT_GRPC_WORKERS = 32
# A call whose deadline is this close is left to the batcher, which fails it as
# deadline_exceeded, rather than dropped as cancelled when gRPC ends it.
_DEADLINE_SLACK_S = 0.05
# time_remaining() of a call without a deadline is about the age of the universe.
_NO_DEADLINE_S = 1e7
_OPTIONAL_FIELDS = ("num_images", "steps", "guidance_scale", "width", "height", "seed")
# Previews are for eyes, not for keeping: small JPEGs keep a stream of 8 steps x 4 images light.


# 1. stubs from the proto, cached by hash -------------------------------------------------------
def _cache_root() -> Path:
    root = default_cache_dir() / "grpc-stubs"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "lcmserve-grpc-stubs"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _import_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the _grpc module imports its messages by this name
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def load_stubs() -> tuple[ModuleType, ModuleType]:
    """(lcmserve_pb2, lcmserve_pb2_grpc), compiled from the proto once per hash of what shapes them."""
    from grpc_tools import protoc

    proto = Path(os.environ.get(PROTO_ENV) or _REPO_PROTO)
    if not proto.is_file():
        raise FileNotFoundError(
            f"lcmserve.proto not found at {proto}; set {PROTO_ENV} to the proto/lcmserve.proto of the lcmserve repo"
        )
    source = proto.read_bytes()
    versions = f"protobuf={metadata.version('protobuf')};grpcio-tools={metadata.version('grpcio-tools')}"
    key = hashlib.sha256(source + versions.encode()).hexdigest()[:16]
    folder = _cache_root() / key
    if not (folder / "lcmserve_pb2_grpc.py").is_file():
        # compile into a private folder and rename it into place, so racing processes never
        # import a half-written stub
        work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        work.chmod(0o755)  # mkdtemp makes it private; a shared cache (a container image) must be readable
        (work / "lcmserve.proto").write_bytes(source)
        include = str(resources.files("grpc_tools") / "_proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{work}", f"-I{include}", f"--python_out={work}",
                          f"--grpc_python_out={work}", str(work / "lcmserve.proto")])
        if rc != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f"grpc_tools.protoc failed (exit {rc}) on {proto}; see its message above")
        try:
            os.replace(work, folder)
        except OSError:  # another process got there first
            shutil.rmtree(work, ignore_errors=True)
        logger.info("compiled gRPC stubs of %s into %s", proto, folder)
    pb2 = _import_file("lcmserve_pb2", folder / "lcmserve_pb2.py")
    pb2_grpc = _import_file("lcmserve_pb2_grpc", folder / "lcmserve_pb2_grpc.py")
    return pb2, pb2_grpc


pb2, pb2_grpc = load_stubs()
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ImageGeneration"].full_name  # "lcmserve.v1.ImageGeneration"


# 2. wire format <-> engine ---------------------------------------------------------------------
def to_generation_request(message: Any) -> GenerationRequest:
    """A GenerateRequest as a GenerationRequest; unset optional fields take its defaults."""
    fields = {name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)}
    return GenerationRequest(prompt=message.prompt, negative_prompt=message.negative_prompt, **fields)


def check_limits(request: GenerationRequest, limits: Any, client: EngineClient) -> None:
    """The server's public limits that REST checks in its protocol: prompt lengths and pixels per image.

    ``limits`` is the server's config (any object); a limit it does not have is not checked.
    """
    if getattr(limits, "max_prompt_chars", None) is not None:
        check_prompt_length(request.prompt, limits)
        check_prompt_length(request.negative_prompt, limits, "negative_prompt")
    if getattr(limits, "max_pixels", None) is not None:
        check_pixels("width", request.width, request.height, client.sampler.model.native_size, limits)


def check_output_format(value: str) -> str:
    fmt = value or "png"
    if fmt not in IMAGE_FORMATS:
        raise InvalidInputError.out_of_range("output_format", value, f"one of {sorted(IMAGE_FORMATS)} (empty: png)")
    return fmt


def to_response(generation: Generation, fmt: str, model: str) -> Any:
    request = generation.request
    images = [
        pb2.Image(data=encode_image(image, fmt), seed=seed, media_type=MEDIA_TYPES[fmt])
        for image, seed in zip(generation.images, generation.seeds)
    ]
    return pb2.GenerateResponse(
        images=images, steps=request.steps, width=request.width, height=request.height,
        guidance_scale=request.guidance_scale, model=model, prompt_truncated=request.truncated,
        timings=pb2.Timings(queue_wait_s=generation.queue_wait_s, engine_s=generation.engine_s,
                            total_s=generation.total_s),
    )


def to_progress(event: StepEvent) -> Any:
    """A StepEvent as a STAGE_STEP progress message, its previews as JPEGs with their seeds."""
    previews = [
        pb2.Image(data=encode_image(image, "jpeg", quality=PREVIEW_JPEG_QUALITY), seed=seed, media_type="image/jpeg")
        for image, seed in zip(event.previews or (), event.seeds)
    ]
    return pb2.Progress(stage=pb2.Progress.STAGE_STEP, step=event.step, total_steps=event.total_steps,
                        first_image=event.first_image, num_images=event.num_images, previews=previews)


def _expired(context: grpc.ServicerContext) -> bool:
    return context.time_remaining() <= _DEADLINE_SLACK_S


def _abort(context: grpc.ServicerContext, error: LCMServeError) -> NoReturn:
    """End the call with the error's status code; type, param and retry-after go in trailing metadata."""
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    trailers = [("lcmserve-error-type", error.type)]
    if error.param:
        trailers.append(("lcmserve-error-param", error.param))
    trailers += [(k.lower(), v) for k, v in error_headers(error).items()]
    context.set_trailing_metadata(tuple(trailers))
    context.abort(getattr(grpc.StatusCode, grpc_code_name(error)), message)


_FINISHED = object()


class _Call:
    """One call's request in the engine: submitted with the call's deadline and cancellation."""

    def __init__(self, client: EngineClient, message: Any, context: grpc.ServicerContext, *, limits: Any = None,
                 with_steps: bool = False, previews: bool = False) -> None:
        self.context = context
        self.request = to_generation_request(message)
        if limits is not None:
            check_limits(self.request, limits, client)
        remaining_s = context.time_remaining()
        deadline = None if remaining_s is None or remaining_s > _NO_DEADLINE_S else time.monotonic() + remaining_s
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        hook = {"on_step": self.events.put, "previews": previews} if with_steps else {}
        self.future: Future = client.submit(self.request, deadline=deadline, is_cancelled=self._client_gone, **hook)
        self.future.add_done_callback(lambda _f: self.events.put(_FINISHED))
        if not context.add_callback(self._on_call_end):
            self._on_call_end()

    def _client_gone(self) -> bool:
        # an expired call is the batcher's to fail as deadline_exceeded, not as cancelled
        return not self.context.is_active() and not _expired(self.context)

    def _on_call_end(self) -> None:
        if not _expired(self.context):
            self.future.cancel()  # frees its queue slot now; a running batch is not interrupted
        self.events.put(_FINISHED)  # wakes the handler thread even when the batch still runs

    def steps(self):
        """The StepEvents the engine reports, until the call finishes."""
        while (event := self.events.get()) is not _FINISHED:
            yield event

    def result(self) -> Generation:
        if not self.future.done():  # the call ended first; the engine may still be on it
            raise CancelledError("the call ended before its images were ready")
        return self.future.result()


# 3. the servicer -----------------------------------------------------------------------------------
class ImageGenerationServicer(pb2_grpc.ImageGenerationServicer):
    """Generate, GenerateStream and GetModel over an EngineClient.

    ``metrics`` (optional) gets ``observe_request("grpc", rpc name, status code name, seconds)``
    per call, and ``track_in_flight("grpc")`` is entered around each call when it has one.
    """

    def __init__(self, client: EngineClient, metrics: Any = None, health_servicer: "ReadinessHealth | None" = None,
                 api_key: str | None = None, limits: Any = None):
        self.client = client
        self.metrics = metrics
        self.health = health_servicer
        self.limits = limits  # the server config's max_prompt_chars / max_pixels, when given
        self._api_key = None if api_key is None else api_key.encode()

    def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        with self._rpc("Generate", context):
            self._authenticate(context)
            fmt = check_output_format(request.output_format)
            call = _Call(self.client, request, context, limits=self.limits)
            for _ in call.steps():
                pass
            return to_response(call.result(), fmt, self.client.model_name)

    def GenerateStream(self, request, context):  # noqa: N802
        with self._rpc("GenerateStream", context):
            self._authenticate(context)
            fmt = check_output_format(request.output_format)
            previews = request.previews if request.HasField("previews") else True
            call = _Call(self.client, request, context, limits=self.limits, with_steps=True, previews=previews)
            total = call.request.steps
            yield pb2.GenerateEvent(progress=pb2.Progress(stage=pb2.Progress.STAGE_QUEUED, step=0, total_steps=total))
            for event in call.steps():
                yield pb2.GenerateEvent(progress=to_progress(event))
            yield pb2.GenerateEvent(result=to_response(call.result(), fmt, self.client.model_name))

    def GetModel(self, request, context):  # noqa: N802
        with self._rpc("GetModel", context):
            info = self.client.model_info()
            return pb2.ModelInfo(**{**info, "lora": info["lora"] or ""})  # proto3 strings have no null

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        """With an API key set, the call must carry ``authorization: Bearer <key>`` metadata."""
        if self._api_key is None:
            return
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
        scheme, _, token = given.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise AuthError("missing or wrong API key: send the metadata 'authorization: Bearer <key>'",
                            param="authorization")

    @contextlib.contextmanager
    def _rpc(self, endpoint: str, context: grpc.ServicerContext):
        """Map whatever the body raises to a status code once, and observe the call."""
        started = time.monotonic()
        code = "OK"
        if self.health is not None:
            self.health.refresh()
        track = getattr(self.metrics, "track_in_flight", None)  # optional: an in-flight gauge
        try:
            with track("grpc") if track is not None else contextlib.nullcontext():
                yield
        except GeneratorExit:  # the client stopped reading a stream
            code = "CANCELLED"
            raise
        except CancelledError:
            if not _expired(context):
                code = "CANCELLED"
                context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the call")
            error = DeadlineExceededError("the call's deadline passed before its images were ready")
            code = grpc_code_name(error)
            _abort(context, error)
        except Exception as exc:
            error = classify(exc)
            if not isinstance(exc, LCMServeError):
                logger.exception("%s failed with an unexpected error", endpoint)
            # the batcher counts what it refuses or fails; what never reached it is counted here
            if not isinstance(exc, LCMServeError) or isinstance(exc, (InvalidInputError, AuthError)):
                self._count_failure(error.type)
            code = grpc_code_name(error)
            _abort(context, error)
        finally:
            self._observe(endpoint, code, time.monotonic() - started)

    def _count_failure(self, error_type: str) -> None:
        on_failure = getattr(self.metrics, "on_failure", None)
        if on_failure is None:
            return
        try:
            on_failure(error_type)
        except Exception:  # metrics must never fail a call
            logger.exception("metrics.on_failure raised; ignored")

    def _observe(self, endpoint: str, code: str, seconds: float) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.observe_request("grpc", endpoint, code, seconds)
        except Exception:  # metrics must never fail a call
            logger.exception("metrics.observe_request raised; ignored")


class ReadinessHealth(health.HealthServicer):
    """grpc.health.v1: SERVING while the client is ready, NOT_SERVING before start and while draining.

    The status is read from ``client.ready`` at every Check, at the start of a Watch and at
    every generation call; a Watch hears of a change at the next of those.
    """

    def __init__(self, client: EngineClient) -> None:
        super().__init__()
        self.client = client
        self.refresh()

    def refresh(self) -> None:
        response = health_pb2.HealthCheckResponse
        status = response.SERVING if self.client.ready else response.NOT_SERVING
        for service in ("", SERVICE_NAME):
            with self._lock:
                changed = self._server_status.get(service) != status
            if changed:
                self.set(service, status)

    def Check(self, request, context):  # noqa: N802
        self.refresh()
        return super().Check(request, context)

    def Watch(self, request, context, send_response_callback=None):  # noqa: N802
        self.refresh()
        return super().Watch(request, context, send_response_callback)


# 4. the server -------------------------------------------------------------------------------------
def build_grpc_server(client: EngineClient, config: Any, metrics: Any = None) -> grpc.Server:
    """A bound, not yet started gRPC server with ImageGeneration, health and reflection.

    Reads from ``config`` (any object): ``host`` (default 127.0.0.1), ``grpc_port`` (50051),
    ``max_message_bytes`` (128 MiB, both directions), ``grpc_workers`` (32 threads),
    ``api_key`` (None: generation calls are open) and the request limits ``max_prompt_chars``
    and ``max_pixels`` (unchecked when absent; the engine's own limits always apply).
    The caller calls ``start()`` and, on shutdown, ``client.drain()`` then ``stop(grace)``.
    """
    host = getattr(config, "host", None) or DEFAULT_HOST
    port = getattr(config, "grpc_port", DEFAULT_GRPC_PORT)
    max_message_bytes = int(getattr(config, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES))
    workers = int(getattr(config, "grpc_workers", DEFAULT_GRPC_WORKERS))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lcmserve-grpc"),
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared socket
        ],
    )
    health_servicer = ReadinessHealth(client)
    servicer = ImageGenerationServicer(client, metrics, health_servicer, api_key=getattr(config, "api_key", None),
                                       limits=config)
    pb2_grpc.add_ImageGenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"gRPC cannot bind {address} ({exc}); is grpc_port={port} in use?") from exc
    if bound == 0:
        raise OSError(f"gRPC cannot bind {address}; is grpc_port={port} in use?")
    logger.info("gRPC server bound to %s:%d (%d workers, max message %d bytes)",
                host, bound, workers, max_message_bytes)
    return server


__all__ = ["SERVICE_NAME", "ImageGenerationServicer", "ReadinessHealth", "build_grpc_server", "load_stubs",
           "pb2", "pb2_grpc", "to_generation_request", "to_progress"]
