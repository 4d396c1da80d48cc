"""Wiring and lifecycle of ``lcmserve serve``: load, warm up, serve REST (+ gRPC), drain on a signal.

    1. load the model, build the sampler, the engine client (metrics hooks) and the REST app
    2. start uvicorn on config.host:port and, when lcmserve.server.grpc is importable, gRPC
    3. warm up in the background; /readyz turns 200 when done
    4. on SIGTERM/SIGINT: /readyz and new generation requests answer 503, queued and running
       work finishes within drain_grace_s, the servers stop, the process exits 0.
       A second SIGINT/SIGTERM stops at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
from typing import Any

import uvicorn

from lcmserve.engine.request import Limits
from lcmserve.engine.request import MAX_STEPS, MIN_STEPS
from lcmserve.engine.sampler import LCMSampler
from lcmserve.server.client import EngineClient
from lcmserve.server.config import ServerConfig
from lcmserve.server.metrics import ServerMetrics
from lcmserve.server.rest import create_app

logger = logging.getLogger(__name__)
# After the engine is idle, how long uvicorn waits for responses still being written.
HTTP_SHUTDOWN_S = 5.0


def build_client(config: ServerConfig, metrics: ServerMetrics) -> EngineClient:
    """Model -> sampler -> engine client whose batcher feeds ``metrics``; not started yet."""
    from lcmserve.models import load_model, load_preview_decoder

    model = load_model(config.model, lora=config.lora, lora_scale=config.lora_scale, unet=config.unet, vae=config.vae,
                       device=config.device, dtype=config.dtype)
    if config.model.startswith("preset:"):
        logger.warning("model %s has random weights: its images are noise (use it to measure speed)", config.model)
    limits = Limits.for_native_size(model.native_size, max_images=config.max_images)
    sampler = LCMSampler(model, limits=limits, max_batch_size=config.max_batch_size)
    if config.backend != "torch" or config.attention != "sdpa":
        from lcmserve.engine.backends import BucketSet, create_backend

        sizes = tuple(sorted({min(2**i, config.max_batch_size) for i in range(11)}))
        buckets = BucketSet(sizes, tuple(range(MIN_STEPS, MAX_STEPS + 1)), ((model.native_size, model.native_size),))
        sampler.backend = create_backend(config.backend, model, buckets=buckets, cache_dir=config.cache_dir,
                                         attention=config.attention)
    preview_decoder = load_preview_decoder(model, config.preview_vae) if config.preview_vae else None
    client = EngineClient(sampler, config.model, config.batcher_config,
                          on_batch=metrics.on_batch, on_failure=metrics.on_failure, preview_decoder=preview_decoder)
    metrics.bind_client(client)
    metrics.set_model_info({**model.describe(), "lcmserve_model": config.model})
    return client


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _GrpcHandle:
    """The gRPC server of lcmserve.server.grpc when that module is there; a no-op otherwise."""

    def __init__(self, client: EngineClient, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.server = None
        if config.grpc_port == 0:
            logger.info("gRPC off (grpc_port=0)")
            return
        try:
            from lcmserve.server.grpc import build_grpc_server
        except ImportError as exc:  # the gRPC adapter is optional; REST serves alone
            logger.warning("gRPC off: lcmserve.server.grpc cannot be imported (%s)", exc)
            return
        self.server = build_grpc_server(client, config, metrics)

    async def start(self, config: ServerConfig) -> None:
        if self.server is not None:
            await _maybe_await(self.server.start())
            logger.info("gRPC listening on %s:%d", config.host, config.grpc_port)

    async def stop(self, grace_s: float) -> None:
        if self.server is None:
            return
        done = await _maybe_await(self.server.stop(grace_s))
        if isinstance(done, threading.Event):  # grpc.Server.stop returns an Event set when stopped
            await asyncio.to_thread(done.wait, grace_s + 1.0)


class _Uvicorn(uvicorn.Server):
    """uvicorn whose signal handler starts our drain instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, on_signal) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._signalled = False

    def handle_exit(self, sig: int, frame) -> None:
        # not recorded in _captured_signals: uvicorn would re-raise it at exit and the
        # default SIGTERM action would turn a clean drain into exit code -15
        if self._signalled:
            logger.warning("second %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        self._signalled = True
        logger.info("%s: draining", signal.Signals(sig).name)
        self._on_signal()


async def _serve(config: ServerConfig, client: EngineClient, metrics: ServerMetrics) -> bool:
    app = create_app(client, config, metrics)
    grpc_server = _GrpcHandle(client, config, metrics)
    loop = asyncio.get_running_loop()
    drained = asyncio.Event()
    clean = [True]

    async def drain() -> None:
        # 1. readyz and new requests answer 503 from here on; queued work runs without waiting to fill
        client.drain()
        # 2. in-flight work finishes (or fails with 503 after the grace); then the listeners stop
        # (both within one grace period: a Kubernetes termination grace sized to it stays enough)
        _, finished = await asyncio.gather(grpc_server.stop(config.drain_grace_s),
                                           asyncio.to_thread(client.close, config.drain_grace_s))
        logger.info("engine drained (%s); stopping HTTP", "all work finished" if finished else
                    f"drain_grace_s={config.drain_grace_s} passed; the rest got 503")
        server.should_exit = True
        drained.set()

    def on_signal() -> None:
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(drain()))

    uv_config = uvicorn.Config(app, host=config.host, port=config.port, lifespan="off", log_config=None,
                               timeout_graceful_shutdown=HTTP_SHUTDOWN_S, server_header=False)
    server = _Uvicorn(uv_config, on_signal)

    async def warm_up() -> None:
        try:
            await asyncio.to_thread(client.start, config.warmup_steps)
            logger.info("ready: %s warmed up with steps %s", config.model, list(config.warmup_steps))
        except Exception:  # a signal during warm-up drains the batcher under it
            if client.batcher.stats().state not in ("draining", "closed"):
                logger.exception("warm-up failed; the server stays unready")
                clean[0] = False
                server.should_exit = True

    await grpc_server.start(config)
    warm_task = asyncio.ensure_future(warm_up())
    try:
        await server.serve()
    finally:
        warm_task.cancel()
        if not drained.is_set():  # uvicorn stopped on its own (a bind error, a forced exit)
            await grpc_server.stop(0.0)
            await asyncio.to_thread(client.close, 0.0 if server.force_exit else config.drain_grace_s)
    return clean[0] and server.started


def serve(config: ServerConfig) -> int:
    """Run the server until a signal drains it; 0 after a drain, 1 when it could not start or warm up."""
    logger.info("lcmserve serve: %s", config.to_dict())
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: reachable from other machines; set api_key (LCMSERVE_API_KEY)", config.host)
    metrics = ServerMetrics()
    client = build_client(config, metrics)
    ok = asyncio.run(_serve(config, client, metrics))
    logger.info("stopped (%s)", "clean" if ok else "not clean")
    return 0 if ok else 1


__all__ = ["build_client", "serve"]
