"""The gRPC adapter: ``lcmserve.v1.ImageGeneration`` over the engine client, plus health and reflection.

Thin on purpose: a call becomes a ``GenerationRequest``, goes to ``EngineClient.submit`` with
the call's deadline and cancellation, and its ``Generation`` becomes a response; validation,
batching and the error taxonomy live in the client, in :mod:`lcmserve.server.protocol` (the
server's limits, shared with REST) and in :mod:`lcmserve.server.errors`.

The stubs in :mod:`lcmserve.server.grpc_stubs` are generated from ``proto/lcmserve.proto`` by
``scripts/grpc_stubs.py`` and committed; a test fails when they and the proto drift apart.

``GenerateStream`` sends one ``STAGE_QUEUED`` progress event when the request is accepted,
one ``STAGE_STEP`` event per denoising step (``EngineClient.submit(..., on_step=...)``), each
with a low-quality JPEG preview of every image's current x0 estimate unless the request sets
``previews = false`` (a decode per step, paid by that request's rows only; the server's
``preview_vae``, e.g. TAESD, makes it cheap), and the images last. When the server has an API
key, every ImageGeneration RPC requires the metadata ``authorization: Bearer <key>``
(UNAUTHENTICATED otherwise, checked before the request message is read); health and reflection
are open. An incoming message is at most ``grpc_max_message_bytes`` (RESOURCE_EXHAUSTED beyond).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from concurrent import futures
from concurrent.futures import CancelledError, Future
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lcmserve.engine.request import GenerationRequest
from lcmserve.errors import AuthError, DeadlineExceededError, InvalidInputError, LCMServeError, NotFoundError
from lcmserve.server.client import (
    IMAGE_FORMATS,
    MEDIA_TYPES,
    PREVIEW_JPEG_QUALITY,
    EngineClient,
    Generation,
    StepEvent,
    encode_image,
)
from lcmserve.server.config import ServerConfig, port_error
from lcmserve.server.errors import classify, grpc_code_name
from lcmserve.server.grpc_gate import CallGate, abort
from lcmserve.server.grpc_stubs import lcmserve_pb2 as pb2
from lcmserve.server.grpc_stubs import lcmserve_pb2_grpc as pb2_grpc
from lcmserve.server.metrics import ServerMetrics
from lcmserve.server.protocol import check_limits

logger = logging.getLogger(__name__)

# Room for a whole response of PNGs at the request limits' defaults (max_images, max_pixels), many times over.
# Incoming messages have their own, much smaller limit: ServerConfig.grpc_max_message_bytes.
MAX_SEND_MESSAGE_BYTES = 128 * 2**20
# Every call holds a thread while its request waits in the batcher's queue.
GRPC_WORKERS = 32
# A call whose deadline is this close is left to the batcher, which fails it as
# deadline_exceeded, rather than dropped as cancelled when gRPC ends it.
_DEADLINE_SLACK_S = 0.05
# time_remaining() of a call without a deadline is about the age of the universe.
_NO_DEADLINE_S = 1e7
_OPTIONAL_FIELDS = ("num_images", "steps", "guidance_scale", "width", "height", "seed")
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ImageGeneration"].full_name  # "lcmserve.v1.ImageGeneration"
# what GetModel answers of model_info(): the message's own fields (the backend is REST's alone)
MODEL_INFO_FIELDS = frozenset(pb2.ModelInfo.DESCRIPTOR.fields_by_name)


# 1. wire format <-> engine ---------------------------------------------------------------------
def to_generation_request(message: Any) -> GenerationRequest:
    """A GenerateRequest as a GenerationRequest; unset optional fields take its defaults."""
    fields = {name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)}
    return GenerationRequest(prompt=message.prompt, negative_prompt=message.negative_prompt,
                             adapters=dict(message.adapters), **fields)


def to_adapter_info(described: dict) -> Any:
    """An adapter's description (``AdapterSet.describe``) as an AdapterInfo message."""
    return pb2.AdapterInfo(name=described["name"], path=described["path"], scale=described["scale"],
                           modules=described["modules"], ranks=described["ranks"])


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


_FINISHED = object()


class _Call:
    """One call's request in the engine: submitted with the call's deadline and cancellation."""

    def __init__(self, client: EngineClient, request: GenerationRequest, context: grpc.ServicerContext, *,
                 with_steps: bool = False, previews: bool = False) -> None:
        self.context = context
        self.request = request
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


# 2. the servicer -----------------------------------------------------------------------------------
class ImageGenerationServicer(pb2_grpc.ImageGenerationServicer):
    """Generate, GenerateStream, GetModel and the adapter RPCs over an EngineClient.

    ``config`` gives the request limits REST checks too (the API key is checked before the
    servicer, by ``grpc_gate.CallGate``); ``metrics`` (optional)
    observes each call (``observe_request("grpc", rpc name, status code name, seconds)``) and
    counts it in flight.
    """

    def __init__(self, client: EngineClient, config: ServerConfig, metrics: ServerMetrics | None = None,
                 health_servicer: ReadinessHealth | None = None) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics
        self.health = health_servicer

    def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        with self._rpc("Generate", context):
            fmt = check_output_format(request.output_format)
            call = _Call(self.client, self._checked(request), context)
            for _ in call.steps():
                pass
            return to_response(call.result(), fmt, self.client.model_name)

    def GenerateStream(self, request, context):  # noqa: N802
        with self._rpc("GenerateStream", context):
            fmt = check_output_format(request.output_format)
            previews = request.previews if request.HasField("previews") else True
            call = _Call(self.client, self._checked(request), context, with_steps=True, previews=previews)
            total = call.request.steps
            yield pb2.GenerateEvent(progress=pb2.Progress(stage=pb2.Progress.STAGE_QUEUED, step=0, total_steps=total))
            for event in call.steps():
                yield pb2.GenerateEvent(progress=to_progress(event))
            yield pb2.GenerateEvent(result=to_response(call.result(), fmt, self.client.model_name))

    def GetModel(self, request, context):  # noqa: N802
        with self._rpc("GetModel", context):
            info = {k: v for k, v in self.client.model_info().items() if k in MODEL_INFO_FIELDS}
            return pb2.ModelInfo(**{**info, "lora": info["lora"] or ""})  # proto3 strings have no null

    def ListAdapters(self, request, context):  # noqa: N802
        with self._rpc("ListAdapters", context):
            return pb2.AdapterList(adapters=[to_adapter_info(a) for a in self.client.describe_adapters()])

    def LoadAdapter(self, request, context):  # noqa: N802
        with self._rpc("LoadAdapter", context):
            scale = request.scale if request.HasField("scale") else 1.0
            return to_adapter_info(self.client.load_adapter(request.name, request.path, scale))

    def RemoveAdapter(self, request, context):  # noqa: N802
        with self._rpc("RemoveAdapter", context):
            self.client.remove_adapter(request.name)
            return pb2.RemoveAdapterResponse()

    def _checked(self, message: Any) -> GenerationRequest:
        """The call's request within the server's limits (the engine checks every field after)."""
        return check_limits(to_generation_request(message), self.config, self.client.sampler.model.native_size)

    @contextlib.contextmanager
    def _rpc(self, endpoint: str, context: grpc.ServicerContext):
        """Map whatever the body raises to a status code once, and observe the call."""
        started = time.monotonic()
        code = "OK"
        if self.health is not None:
            self.health.refresh()
        try:
            with self.metrics.track_in_flight("grpc") if self.metrics is not None else contextlib.nullcontext():
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
            abort(context, error)
        except Exception as exc:
            error = classify(exc)
            if not isinstance(exc, LCMServeError):
                logger.exception("%s failed with an unexpected error", endpoint)
            # the batcher counts what it refuses or fails; what never reached it is counted here
            if not isinstance(exc, LCMServeError) or isinstance(exc, (InvalidInputError, NotFoundError, AuthError)):
                self._count_failure(error.type)
            code = grpc_code_name(error)
            abort(context, error)
        finally:
            self._observe(endpoint, code, time.monotonic() - started)

    def on_refused(self, method: str, error: LCMServeError) -> None:
        """A call the gate refused before it reached the servicer, counted as the servicer counts its own."""
        self._count_failure(error.type)
        self._observe(method.rsplit("/", 1)[-1], grpc_code_name(error), 0.0)

    def _count_failure(self, error_type: str) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.on_failure(error_type)
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


# 3. the server -------------------------------------------------------------------------------------
def build_grpc_server(client: EngineClient, config: ServerConfig, metrics: ServerMetrics | None = None) -> grpc.Server:
    """A bound, not yet started gRPC server on ``config.host:config.grpc_port`` with ImageGeneration,
    health and reflection.

    The caller calls ``start()`` and, on shutdown, ``client.drain()`` then ``stop(grace)``.
    """
    host, port = config.host, config.grpc_port
    health_servicer = ReadinessHealth(client)
    servicer = ImageGenerationServicer(client, config, metrics, health_servicer)
    # every method of ImageGeneration takes the key; health and reflection stay open for probes and tools
    gate = CallGate(config.api_key, keyed=lambda method: method.startswith(f"/{SERVICE_NAME}/"),
                    on_refused=servicer.on_refused)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="lcmserve-grpc"),
        interceptors=[gate],
        options=[
            ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", config.grpc_max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared socket
        ],
    )
    pb2_grpc.add_ImageGenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises on a port it cannot bind, older releases return 0
        raise port_error("grpc_port", host, port, str(exc)) from None
    if bound == 0:
        raise port_error("grpc_port", host, port, "grpc could not bind it: in use, or not an address of this machine")
    logger.info("gRPC server bound to %s:%d (%d workers, incoming messages of at most %d bytes)",
                host, bound, GRPC_WORKERS, config.grpc_max_message_bytes)
    return server


__all__ = ["SERVICE_NAME", "ImageGenerationServicer", "ReadinessHealth", "build_grpc_server", "pb2", "pb2_grpc",
           "to_adapter_info", "to_generation_request", "to_progress"]
