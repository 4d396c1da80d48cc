"""Prometheus metrics of the server, on a private registry (no process-global state).

Names carry the ``lcmserve_`` namespace and their unit; labels are few and bounded
(protocol, endpoint template, status code, stage, failure type, the name of a loaded adapter,
dropped when it is removed), never a prompt or a seed.
The batcher feeds them through ``on_batch`` / ``on_failure``; REST (and gRPC) report each
request through ``observe_request`` and ``track_in_flight``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from lcmserve.engine.batcher import BatchInfo

if TYPE_CHECKING:
    from lcmserve.server.client import EngineClient

# From one step of a tiny model to an SDXL batch under load: the range a latency of this server spans.
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGES = {"text": "text_s", "unet": "unet_s", "vae": "vae_s"}


class ServerMetrics:
    """Every metric the server exports; ``render()`` gives the text exposition of /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "lcmserve_request_duration_seconds", "Request latency, arrival to response, by protocol/endpoint/status.",
            ["protocol", "endpoint", "status"], buckets=SECONDS_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "lcmserve_queue_wait_seconds", "Time a request waited in the batcher's queue before its batch ran.",
            buckets=SECONDS_BUCKETS, registry=r)
        self.inference = Histogram(
            "lcmserve_inference_seconds", "Engine time of one batch per stage (text encoder, UNet loop, VAE).",
            ["stage"], buckets=SECONDS_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "lcmserve_batch_size_rows", "Rows (images) per engine batch.", buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("lcmserve_images_generated", "Images generated.", registry=r)
        self.in_flight = Gauge(
            "lcmserve_requests_in_flight", "Requests being handled now.", ["protocol"], registry=r)
        self.queue_depth = Gauge("lcmserve_queue_depth_rows", "Rows waiting in the batcher's queue.", registry=r)
        self.ready = Gauge("lcmserve_ready", "1 when the model is loaded and warmed and the server takes work.",
                           registry=r)
        self.failures = Counter(
            "lcmserve_failures", "Failed requests by error type (the taxonomy's type strings, and cancelled).",
            ["type"], registry=r)
        self.model = Info("lcmserve_model", "The served model.", registry=r)
        self.adapter_requests = Counter(
            "lcmserve_adapter_requests", "Requests served with a LoRA adapter, by adapter (loaded ones only).",
            ["adapter"], registry=r)
        self.adapter_rows = Counter(
            "lcmserve_adapter_rows", "Rows (images) served with a LoRA adapter, by adapter (loaded ones only).",
            ["adapter"], registry=r)

    # hooks of the batcher (worker thread; must be cheap) --------------------------------------
    def on_batch(self, info: BatchInfo) -> None:
        self.batch_size.observe(info.rows)
        for wait_s in info.queue_wait_s:
            self.queue_wait.observe(wait_s)
        if info.error is not None:
            return
        self.images.inc(info.rows)
        times = info.times
        for stage, attr in STAGES.items():
            if times is not None and hasattr(times, attr):
                self.inference.labels(stage).observe(getattr(times, attr))

    def on_failure(self, error_type: str) -> None:
        self.failures.labels(error_type).inc()

    def on_adapters(self, names: tuple[str, ...], rows: int) -> None:
        """One finished request that ran with ``names``, over ``rows`` images."""
        for name in names:
            self.adapter_requests.labels(name).inc()
            self.adapter_rows.labels(name).inc(rows)

    def forget_adapter(self, name: str) -> None:
        """Drop a removed adapter's series, so that the label stays bounded by the adapters loaded now."""
        for counter in (self.adapter_requests, self.adapter_rows):
            try:
                counter.remove(name)
            except KeyError:  # it served no request
                pass

    # the adapters' side ---------------------------------------------------------------------------
    def observe_request(self, protocol: str, endpoint: str, status: str, seconds: float) -> None:
        """One finished request; ``endpoint`` is a route template or RPC name, never a raw path."""
        self.request_duration.labels(protocol, endpoint, str(status)).observe(seconds)

    @contextlib.contextmanager
    def track_in_flight(self, protocol: str) -> Iterator[None]:
        gauge = self.in_flight.labels(protocol)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def bind_client(self, client: "EngineClient") -> None:
        """Queue depth and readiness read live from the engine client at scrape time."""
        self.queue_depth.set_function(lambda: client.batcher.stats().queued_rows)
        self.ready.set_function(lambda: 1.0 if client.ready else 0.0)

    def set_model_info(self, info: dict[str, Any]) -> None:
        self.model.info({k: str(v) for k, v in info.items() if not isinstance(v, dict)})

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["SECONDS_BUCKETS", "ServerMetrics"]
