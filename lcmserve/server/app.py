"""Wiring and lifecycle of ``lcmserve serve``: load, warm up, serve REST (+ gRPC), drain on a signal.

    1. bind config.host:port and check grpc_port before the model loads: a port in use is one line
       that names the flag to change, not a traceback after a long load
    2. load the model, the adapters given with --adapter and those bundled with the model, build the sampler,
       the engine client (metrics hooks) and the REST app
    3. serve uvicorn on the bound sockets and, unless grpc_port is 0, gRPC on config.host:grpc_port
    4. warm up in the background; /readyz turns 200 when done
    5. on SIGTERM/SIGINT: /readyz and new generation requests answer 503, queued and running
       work finishes within drain_grace_s (what is left gets 503), the servers stop, the engine's
       last batch ends, the process exits 0. A second SIGINT/SIGTERM stops at once.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lcmserve.engine import backends
from lcmserve.engine.adapters import AdapterSet
from lcmserve.engine.request import MAX_STEPS, MIN_STEPS, Limits
from lcmserve.engine.sampler import LCMSampler
from lcmserve.errors import LCMServeError
from lcmserve.models import load_model, load_preview_decoder
from lcmserve.models.registry import served_adapters
from lcmserve.server.client import EngineClient
from lcmserve.server.config import ServerConfig, adapter_paths, port_error
from lcmserve.server.errors import RequestTimeoutError, error_body
from lcmserve.server.metrics import ServerMetrics
from lcmserve.server.rest import create_app

logger = logging.getLogger(__name__)
# After the engine is idle, how long uvicorn waits for responses still being written.
HTTP_SHUTDOWN_S = 5.0


def bind_port(host: str, port: int, name: str = "port") -> list[socket.socket]:
    """Sockets bound, not yet listening, on every address of host:port, as asyncio's create_server binds them.

    Bound before the model loads, they keep the port for this server meanwhile; ``name`` is the config
    field whose flag a failure names (port or grpc_port).
    """
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                    flags=socket.AI_PASSIVE):
            sock = socket.socket(family, kind, proto)
            # as asyncio and uvicorn do: connections of a previous run in TIME_WAIT do not block a restart
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRNOTAVAIL:  # not available: that family is off on this machine
                    raise
                continue
            sockets.append(sock)
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, "no address of this machine")
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise port_error(name, host, port, exc) from None
    return sockets


def build_client(config: ServerConfig, metrics: ServerMetrics) -> EngineClient:
    """Model -> sampler -> engine client whose batcher feeds ``metrics``; not started yet.

    ``backend=auto`` picks the backend, and the dtype and attention left at auto, before the model loads
    (it loads in the picked dtype); the backend keeps the reason, which GET /v1/models reports."""
    choice = None
    if config.backend == backends.AUTO:
        choice = backends.choose_before_load(config.model, unet=config.unet, device=config.device,
                                             dtype=config.dtype, attention=config.attention)
    backend, dtype, attention = (choice.backend, choice.dtype, choice.attention) if choice else (
        config.backend, config.dtype, config.attention)
    model = load_model(config.model, lora=config.lora, lora_scale=config.lora_scale, unet=config.unet, vae=config.vae,
                       device=config.device, dtype=dtype)
    if config.model.startswith("preset:"):
        logger.warning("model %s has random weights: its images are noise (use it to measure speed)", config.model)
    limits = Limits.for_native_size(model.native_size, max_images=config.max_images)
    adapters = AdapterSet(model)  # POST /v1/adapters may add more at run time
    for name, path in adapter_paths(config.adapters).items():
        adapters.load(name, path)
    if config.bundled_adapters:
        for name, lora in served_adapters(config.model).items():
            if name in adapters.names():
                continue
            try:
                adapters.load(name, lora)
            except LCMServeError as exc:  # an installation without the file still serves its model
                logger.warning("bundled adapter %s not loaded: %s", name, exc)
    sampler = LCMSampler(model, limits=limits, max_batch_size=config.max_batch_size, adapters=adapters)
    if backend != "torch" or attention != "sdpa":
        sizes = tuple(sorted({min(2**i, config.max_batch_size) for i in range(11)}))
        native = (model.native_size, model.native_size)
        buckets = backends.BucketSet(sizes, tuple(range(MIN_STEPS, MAX_STEPS + 1)), (native,))
        # warm=False: the buckets build in the warm-up, once the HTTP side answers (/readyz 503 meanwhile)
        sampler.backend = backends.create_backend(backend, model, buckets=buckets, cache_dir=config.cache_dir,
                                                  attention=attention, warm=False)
    if choice is not None:
        sampler.backend.reason = choice.reason
    preview_decoder = load_preview_decoder(model, config.preview_vae) if config.preview_vae else None
    client = EngineClient(sampler, config.model, config.batcher_config,
                          on_batch=metrics.on_batch, on_failure=metrics.on_failure, preview_decoder=preview_decoder,
                          on_adapters=metrics.on_adapters, on_adapter_removed=metrics.forget_adapter)
    metrics.bind_client(client)
    metrics.set_model_info({**model.describe(), "lcmserve_model": config.model})
    return client


class _GrpcHandle:
    """The gRPC server of lcmserve.server.grpc when grpcio is installed and grpc_port is set; a no-op otherwise."""

    def __init__(self, client: EngineClient, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.server = None
        if config.grpc_port == 0:
            logger.info("gRPC off (grpc_port=0)")
            return
        try:
            from lcmserve.server.grpc import build_grpc_server
        except ImportError as exc:  # grpcio is missing: REST serves alone
            logger.warning("gRPC off: lcmserve.server.grpc cannot be imported (%s)", exc)
            return
        self.server = build_grpc_server(client, config, metrics)

    async def start(self, config: ServerConfig) -> None:
        if self.server is not None:
            self.server.start()
            logger.info("gRPC listening on %s:%d", config.host, config.grpc_port)

    async def stop(self, grace_s: float) -> None:
        if self.server is None:
            return
        stopped = self.server.stop(grace_s)  # a threading.Event, set once the server has stopped
        await asyncio.to_thread(stopped.wait, grace_s + 1.0)


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on a request's headers: ``header_timeout_s`` from the
    connection's start, or from the end of the previous response on a kept-alive connection.

    A client that sent part of its headers and misses it gets 408 and the connection closes; one that
    sent nothing (an idle or pre-opened connection) is closed without a response, since a client that
    reuses such a socket would read an answer to a request it never made. uvicorn's own timeout_keep_alive
    closes a silent connection only: a byte now and then would keep it open forever. The body has
    its deadline in BodyLimitMiddleware, counted from the end of the headers.
    """

    header_timeout_s = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        self._bytes_waiting = True
        super().data_received(data)
        self._headers_arrived()

    def on_response_complete(self) -> None:
        self._arm_header_deadline()
        super().on_response_complete()
        self._headers_arrived()  # a pipelined request may be in already

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._waiting_after = self.cycle  # a new cycle means a new request's headers are in
        self._bytes_waiting = False  # any byte of the next request yet
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_deadline(self) -> None:
        timer, self._header_timer = getattr(self, "_header_timer", None), None
        if timer is not None:
            timer.cancel()

    def _headers_arrived(self) -> None:
        if getattr(self, "_header_timer", None) is not None and self.cycle is not self._waiting_after:
            self._cancel_header_deadline()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.cycle is not self._waiting_after:
            return
        if not self._bytes_waiting:
            self.transport.close()
            return
        # h11 has no request to answer yet, so the response is written as bytes
        error = RequestTimeoutError(f"the request headers did not arrive within read_timeout_s={self.header_timeout_s}")
        body = json.dumps(error_body(error)).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def uvicorn_config(app, config: ServerConfig) -> uvicorn.Config:
    """How uvicorn serves the REST app: config.host:port, h11 with the header deadline, no lifespan."""
    protocol = type("LCMServeH11", (HeaderDeadlineH11,), {"header_timeout_s": config.read_timeout_s})
    return uvicorn.Config(app, host=config.host, port=config.port, lifespan="off", log_config=None, http=protocol,
                          timeout_graceful_shutdown=HTTP_SHUTDOWN_S, server_header=False)


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


async def _serve(config: ServerConfig, client: EngineClient, metrics: ServerMetrics,
                 sockets: list[socket.socket]) -> tuple[bool, bool]:
    """Serve until drained; (clean, forced): forced after a second signal, when nothing more may be waited for."""
    app = create_app(client, config, metrics)
    grpc_server = _GrpcHandle(client, config, metrics)
    loop = asyncio.get_running_loop()
    drained = asyncio.Event()
    clean = [True]

    async def drain() -> None:
        # 1. readyz and new requests answer 503 from here on; queued work runs without waiting to fill
        client.drain()
        # 2. in-flight work finishes (or fails with 503 after the grace); then the listeners stop
        # (both within one grace period; serve() then waits for the engine's running batch, so a
        # Kubernetes termination grace of drain_grace_s plus one batch stays enough)
        _, finished = await asyncio.gather(grpc_server.stop(config.drain_grace_s),
                                           asyncio.to_thread(client.close, config.drain_grace_s))
        logger.info("engine drained (%s); stopping HTTP", "all work finished" if finished else
                    f"drain_grace_s={config.drain_grace_s} passed; the rest got 503")
        server.should_exit = True
        drained.set()

    def on_signal() -> None:
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(drain()))

    server = _Uvicorn(uvicorn_config(app, config), on_signal)

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
    logger.info("REST listening on http://%s:%d (playground at /, API docs at /docs)", config.host, config.port)
    try:
        await server.serve(sockets=sockets)
    except OSError as exc:  # another program took the port between the bind and the listen
        if server.started:
            raise
        raise port_error("port", config.host, config.port, exc) from None
    finally:
        warm_task.cancel()
        if not drained.is_set():  # uvicorn stopped on its own (a bind error, a forced exit)
            await grpc_server.stop(0.0)
            await asyncio.to_thread(client.close, 0.0 if server.force_exit else config.drain_grace_s)
    return clean[0] and server.started, server.force_exit


def _engine_stopped(client: EngineClient, forced: bool) -> bool:
    """Wait for the engine's worker thread to end after the drain; False when it is still inside a batch.

    A batch may still run after the grace (its requests got 503 already): torch cannot be
    interrupted, and an interpreter that exits under a thread inside torch aborts.
    """
    if client.wait_for_worker(0.0):
        return True
    bound_s = 0.0 if forced else client.batch_bound_s()
    logger.info("waiting up to %.1f s for the engine's running batch to end", bound_s)
    return client.wait_for_worker(bound_s)


def serve(config: ServerConfig) -> int:
    """Run the server until a signal drains it; 0 after a drain, 1 when it could not start or warm up."""
    sockets = bind_port(config.host, config.port)
    try:
        if config.grpc_port:  # checked only: grpc binds its own socket once the model is loaded
            for sock in bind_port(config.host, config.grpc_port, "grpc_port"):
                sock.close()
        logger.info("lcmserve serve: %s", config.to_dict())
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("binding %s: reachable from other machines; set api_key (LCMSERVE_API_KEY)", config.host)
        metrics = ServerMetrics()
        client = build_client(config, metrics)
        ok, forced = asyncio.run(_serve(config, client, metrics, sockets))
    finally:
        for sock in sockets:  # uvicorn closes them when it ran; this covers a failure before
            sock.close()
    if not _engine_stopped(client, forced):
        # the interpreter's normal exit would abort under the running batch; leave without it
        logger.error("stopped (not clean): the engine is still inside a batch; exiting without waiting for it")
        logging.shutdown()
        os._exit(1)
    logger.info("stopped (%s)", "clean" if ok else "not clean")
    return 0 if ok else 1


__all__ = ["HeaderDeadlineH11", "bind_port", "build_client", "serve", "uvicorn_config"]
