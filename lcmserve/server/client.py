"""The engine client: the one place where requests are checked, batched and turned into results.

REST and gRPC are thin adapters over ``EngineClient``: they translate their wire format to a
``GenerationRequest``, call ``generate`` (async) or ``submit`` (a Future), and encode the
``Generation`` they get back. Validation happens here, before a request joins a batch, so a
bad value fails only its own request (422 / INVALID_ARGUMENT).

A caller that wants progress passes ``on_step``: it gets a ``StepEvent`` per denoising step,
and with ``previews=True`` the step's x0 estimate of its own images decoded by the model's
VAE, or by the preview decoder when one is given (a decode per step, paid by that request's
rows only; a tiny decoder such as TAESD makes it cheap).
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from lcmserve.engine.adapters import REMOVE_TIMEOUT_S, AdapterSet
from lcmserve.engine.batcher import Batcher, BatcherConfig, BatchInfo, BucketKey, RowsResult
from lcmserve.engine.kernels.attention import SmallHeadAttnProcessor
from lcmserve.engine.request import MAX_STEPS, GenerationRequest, ResolvedRequest, check_prompt
from lcmserve.engine.sampler import LCMSampler
from lcmserve.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError

logger = logging.getLogger(__name__)
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PREVIEW_JPEG_QUALITY = 50  # step previews (gRPC GenerateStream, REST /generate/stream): small and quick
# Added to the estimate of one full batch when waiting for the engine's last batch at shutdown:
# a batch may also decode previews and encode images, which the estimate does not see.
BATCH_SLACK_S = 10.0


def _copy_failure(outer: Future, inner: Future) -> bool:
    """True when ``inner`` did not succeed; its cancellation or error is then copied to ``outer``.

    ``outer`` may be done already (its caller cancelled it while the batch ran): nothing is copied then.
    """
    if not inner.cancelled() and inner.exception() is None:
        return False
    try:
        if inner.cancelled():
            outer.cancel()
        else:
            outer.set_exception(inner.exception())
    except InvalidStateError:
        pass
    return True


def attention_of(model) -> str:
    """small-head when our kernel's processor runs some of the UNet's attention layers, else sdpa."""
    layers = (getattr(m, "processor", None) for m in model.unet.modules())
    return "small-head" if any(isinstance(p, SmallHeadAttnProcessor) for p in layers) else "sdpa"


def encode_image(image: torch.Tensor, fmt: str = "png", quality: int = 95) -> bytes:
    """float [3, H, W] in [0, 1] -> encoded bytes; ``quality`` (1-95) applies to JPEG and WebP."""
    from PIL import Image

    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=IMAGE_FORMATS[fmt], **({"quality": quality} if fmt != "png" else {}))
    return buffer.getvalue()


@dataclass(frozen=True)
class StepEvent:
    """One denoising step done for images ``first_image .. first_image + num_images - 1`` of a request.

    A request larger than one batch runs in several batches, each reporting its own steps.
    ``previews`` holds the step's x0 estimate of those images decoded to float [3, H, W] in
    [0, 1], when the request asked for previews; None otherwise.
    """

    step: int  # steps done, 1..total_steps
    total_steps: int
    first_image: int
    num_images: int
    seeds: tuple[int, ...]
    previews: list[torch.Tensor] | None = None


@dataclass
class Generation:
    """A finished request: its resolved fields, one image per seed, and where the time went."""

    request: ResolvedRequest
    images: list[torch.Tensor]
    seeds: list[int]
    queue_wait_s: float
    engine_s: float
    batch_sizes: tuple[int, ...]
    total_s: float = 0.0
    extra: dict = field(default_factory=dict)


class EngineClient:
    """Owns the sampler and its batcher; safe to call from any thread or event loop."""

    def __init__(self, sampler: LCMSampler, model_name: str, config: BatcherConfig | None = None,
                 on_batch: Callable[[BatchInfo], None] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 preview_decoder: torch.nn.Module | None = None,
                 on_adapters: Callable[[tuple[str, ...], int], None] | None = None,
                 on_adapter_removed: Callable[[str], None] | None = None) -> None:
        """``on_adapters(names, rows)`` hears of every finished request that used adapters, ``on_adapter_removed``
        of every adapter unloaded (the metrics keep a label per loaded adapter only)."""
        self.sampler = sampler
        self._on_adapters = on_adapters
        self._on_adapter_removed = on_adapter_removed
        self._loading = threading.Lock()  # one load at a time: a name is checked free and taken at once
        self.preview_decoder = preview_decoder
        self.model_name = model_name
        self._on_batch = on_batch
        self._slowest_s = 0.0  # engine seconds per row, step and pixel: the most any batch took
        self.batcher = Batcher(sampler.run_rows, config or BatcherConfig(), on_batch=self._batch_done,
                               on_failure=on_failure)
        self.ready = False

    def model_info(self) -> dict:
        """What a client may ask of the served model and how it runs: REST's ``GET /v1/models`` card and gRPC's
        ``GetModel`` (whose message has no field for the backend: REST alone reports it).

        ``backend_reason`` is why the backend was picked, when the backend carries one (``--backend auto``)."""
        model, backend = self.sampler.model, self.sampler.backend
        return {"id": self.model_name, "guidance_mode": model.guidance_mode,
                "default_guidance_scale": model.default_guidance_scale, "native_size": model.native_size,
                "max_prompt_tokens": model.max_prompt_tokens, "lora": model.lora, "backend": backend.name, "dtype": model.dtype_name,
                "attention": attention_of(model), "backend_reason": getattr(backend, "reason", None),
                "adapters": self.adapter_names()}

    # lifecycle ------------------------------------------------------------------------
    def start(self, warmup_steps: tuple[int, ...] = (1,)) -> None:
        """Build the backend's programs (compiled, cuda-graph: every bucket; minutes at a first start, seconds from
        the cache), start the worker and run one request per warm-up step count before reporting ready."""
        self.sampler.backend.warmup()
        self.batcher.start()
        for steps in warmup_steps:
            self.submit(GenerationRequest("warm-up", steps=steps, seed=0)).result()
        self.ready = True

    def drain(self) -> None:
        self.ready = False
        self.batcher.drain()

    def close(self, grace_s: float | None = None) -> bool:
        """Drain, let queued and running work finish within ``grace_s``, fail the rest (503); True if all finished.

        A batch still inside the engine goes on after this returns: ``wait_for_worker`` waits for it.
        """
        self.ready = False
        return self.batcher.close(grace_s)

    def wait_for_worker(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the engine's worker thread to end (after ``close``); True once it has.

        A process must not exit while that thread is inside torch: the runtime's exit handlers
        then abort the process.
        """
        return self.batcher.join(timeout_s)

    def batch_bound_s(self) -> float:
        """A generous bound on one batch: the largest (rows, steps, pixels) at the slowest speed seen."""
        largest = self.batcher.config.max_batch_size * MAX_STEPS * self.sampler.limits.max_size ** 2
        return self._slowest_s * largest + BATCH_SLACK_S

    def _batch_done(self, info: BatchInfo) -> None:
        if info.error is None and info.rows:
            work = info.rows * info.key.steps * info.key.width * info.key.height
            self._slowest_s = max(self._slowest_s, info.engine_s / work)
        if self._on_batch is not None:
            self._on_batch(info)

    # adapters (blocking: the async routes call them in a thread) ------------------------
    @property
    def adapters(self) -> AdapterSet | None:
        return self.sampler.adapters

    def adapter_names(self) -> list[str]:
        return [] if self.adapters is None else self.adapters.names()

    def describe_adapters(self) -> list[dict]:
        return [] if self.adapters is None else self.adapters.describe()

    def _not_loaded(self, name: str, param: str) -> NotFoundError:
        loaded = ", ".join(self.adapter_names()) or "none"
        return NotFoundError(f"{param}: no adapter named {name!r} is loaded; loaded: {loaded}", param=param)

    def load_adapter(self, name: str, path: str, scale: float = 1.0) -> dict:
        """Read a LoRA as ``name``; its description. A taken name is a conflict, a bad file invalid input."""
        if self.adapters is None:
            raise InvalidInputError("adapters: this server holds no adapters beside its model", param="name")
        check_prompt(path, "path")  # a string the file system can take: no NUL, valid Unicode
        with self._loading:
            if self.adapters.removing(name):
                raise ConflictError(f"name: the adapter {name!r} is being removed, once the requests that use it "
                                    "end; load it again after that, or choose another name", param="name")
            if name in self.adapters.names():
                raise ConflictError(f"name: an adapter {name!r} is already loaded; remove it first (DELETE "
                                    f"/v1/adapters/{name}) or choose another name", param="name")
            return self.adapters.load(name, path, scale).describe()

    def remove_adapter(self, name: str, timeout_s: float = REMOVE_TIMEOUT_S) -> None:
        """Unload ``name`` once the requests using it, queued or running, have ended (at most ``timeout_s``, else 503
        and it stays); new requests that name it get 404 from the start of the wait."""
        if self.adapters is None or name not in self.adapters.names():
            raise self._not_loaded(name, "name")
        try:
            self.adapters.remove(name, timeout_s)
        except InvalidInputError:  # removed by another call since the check
            raise self._not_loaded(name, "name") from None
        except TimeoutError as exc:
            raise UnavailableError(f"{exc}; retry the removal once the requests using it are done") from None
        if self._on_adapter_removed is not None:
            self._on_adapter_removed(name)

    def _check_adapter_names(self, request: GenerationRequest) -> None:
        """404 for an adapter name that is not loaded (the engine would refuse it as invalid input)."""
        loaded = set(self.adapter_names())
        for name, _ in request.adapters:
            if name not in loaded:
                raise self._not_loaded(name, "adapters")

    def _hold_adapters(self, request: ResolvedRequest) -> tuple:
        """Hold the request's adapters until it ends, so that a removal waits for it even while it is queued."""
        if not request.adapters or self.adapters is None:
            return ()
        try:
            return self.adapters.hold([name for name, _ in request.adapters])
        except InvalidInputError:  # a removal started since the request's names were checked
            loaded = self.adapter_names()
            missing = next((name for name, _ in request.adapters if name not in loaded), request.adapters[0][0])
            raise self._not_loaded(missing, "adapters") from None

    def _release_adapters(self, held: tuple) -> None:
        if held:
            self.adapters.release(held)

    # requests -------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        self._check_adapter_names(request)
        return self.sampler.resolve(request)

    @torch.inference_mode()
    def decode_previews(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """x0 estimates [n, C, h, w] -> images float [3, H, W] in [0, 1] on the CPU.

        By the model's VAE, the same decode as the torch backend's last stage, so that the preview
        of the last step is the final image (before its encoding); or by the preview decoder.
        """
        vae = self.preview_decoder if self.preview_decoder is not None else self.sampler.model.vae
        scaled = (latents / vae.config.scaling_factor).to(vae.device, vae.dtype)
        images = vae.decode(scaled, return_dict=False)[0]
        return list((images.float() / 2 + 0.5).clamp(0, 1).cpu())

    def submit(self, request: GenerationRequest, *, deadline: float | None = None,
               is_cancelled: Callable[[], bool] | None = None,
               on_step: Callable[[StepEvent], None] | None = None, previews: bool = False,
               preview_steps: Collection[int] | None = None) -> Future:
        """Check the request, queue its rows; the Future resolves to a ``Generation``.

        ``on_step`` (called on the engine's thread; must be quick and thread-safe) gets a
        ``StepEvent`` per denoising step; ``previews`` adds the decoded x0 estimates to it, at every
        step or at the (1-based) ``preview_steps`` only.
        """
        started = time.monotonic()
        resolved = self.resolve(request)
        held = self._hold_adapters(resolved)
        key = BucketKey(self.model_name, resolved.steps, resolved.width, resolved.height)
        rows_in = resolved.rows()
        hook = None
        if on_step is not None:
            def hook(i: int, first_row: int, x0_rows: torch.Tensor) -> None:
                n = len(x0_rows)
                on_step(StepEvent(
                    step=i + 1, total_steps=resolved.steps, first_image=first_row, num_images=n,
                    seeds=tuple(r.seed for r in rows_in[first_row : first_row + n]),
                    previews=self.decode_previews(x0_rows)
                    if previews and (preview_steps is None or i + 1 in preview_steps) else None,
                ))
        try:
            inner = self.batcher.submit(key, rows_in, deadline=deadline, is_cancelled=is_cancelled, on_step=hook)
        except BaseException:
            self._release_adapters(held)
            raise
        outer: Future = Future()

        def done(f: Future) -> None:
            try:
                if _copy_failure(outer, f):
                    return
                rows: RowsResult = f.result()
                try:
                    outer.set_result(Generation(
                        request=resolved, images=list(rows.images), seeds=[r.seed for r in rows_in],
                        queue_wait_s=rows.queue_wait_s, engine_s=rows.engine_s, batch_sizes=rows.batch_sizes,
                        total_s=time.monotonic() - started,
                    ))
                except InvalidStateError:  # cancelled by its caller while the batch ran: nobody waits for it
                    pass
                if resolved.adapters and self._on_adapters is not None:
                    self._on_adapters(tuple(name for name, _ in resolved.adapters), len(rows_in))
            finally:
                # last, so that a removal waiting for these adapters drops their metric series after this count
                self._release_adapters(held)

        inner.add_done_callback(done)
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return outer

    async def generate(self, request: GenerationRequest, *, timeout_s: float | None = None,
                       is_cancelled: Callable[[], bool] | None = None) -> Generation:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return await asyncio.wrap_future(self.submit(request, deadline=deadline, is_cancelled=is_cancelled))
