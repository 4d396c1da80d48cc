"""The engine client: the one place where requests are checked, batched and turned into results.

REST and gRPC are thin adapters over ``EngineClient``: they translate their wire format to a
``GenerationRequest``, call ``generate`` (async) or ``submit`` (a Future), and encode the
``Generation`` they get back. Validation happens here, before a request joins a batch, so a
bad value fails only its own request (422 / INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from lcmserve.engine.batcher import Batcher, BatcherConfig, BatchInfo, BucketKey, RowsResult
from lcmserve.engine.request import GenerationRequest, ResolvedRequest
from lcmserve.engine.sampler import LCMSampler

logger = logging.getLogger(__name__)
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: torch.Tensor, fmt: str = "png") -> bytes:
    """float [3, H, W] in [0, 1] -> encoded bytes."""
    from PIL import Image

    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=IMAGE_FORMATS[fmt], **({"quality": 95} if fmt != "png" else {}))
    return buffer.getvalue()


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
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.sampler = sampler
        self.model_name = model_name
        self.batcher = Batcher(sampler.run_rows, config or BatcherConfig(), on_batch=on_batch, on_failure=on_failure)
        self.ready = False

    # lifecycle ------------------------------------------------------------------------
    def start(self, warmup_steps: tuple[int, ...] = (1,)) -> None:
        """Start the worker and run one request per warm-up step count before reporting ready."""
        self.batcher.start()
        for steps in warmup_steps:
            self.submit(GenerationRequest("warm-up", steps=steps, seed=0)).result()
        self.ready = True

    def drain(self) -> None:
        self.ready = False
        self.batcher.drain()

    def close(self, grace_s: float | None = None) -> bool:
        self.ready = False
        return self.batcher.close(grace_s)

    # requests -------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        return self.sampler.resolve(request)

    def submit(self, request: GenerationRequest, *, deadline: float | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> Future:
        """Check the request, queue its rows; the Future resolves to a ``Generation``."""
        started = time.monotonic()
        resolved = self.resolve(request)
        key = BucketKey(self.model_name, resolved.steps, resolved.width, resolved.height)
        rows_in = resolved.rows()
        inner = self.batcher.submit(key, rows_in, deadline=deadline, is_cancelled=is_cancelled)
        outer: Future = Future()

        def done(f: Future) -> None:
            if f.cancelled():
                outer.cancel()
                return
            error = f.exception()
            if error is not None:
                outer.set_exception(error)
                return
            rows: RowsResult = f.result()
            outer.set_result(Generation(
                request=resolved, images=list(rows.images), seeds=[r.seed for r in rows_in],
                queue_wait_s=rows.queue_wait_s, engine_s=rows.engine_s, batch_sizes=rows.batch_sizes,
                total_s=time.monotonic() - started,
            ))

        inner.add_done_callback(done)
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return outer

    async def generate(self, request: GenerationRequest, *, timeout_s: float | None = None,
                       is_cancelled: Callable[[], bool] | None = None) -> Generation:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return await asyncio.wrap_future(self.submit(request, deadline=deadline, is_cancelled=is_cancelled))
