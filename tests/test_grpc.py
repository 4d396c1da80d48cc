"""The gRPC adapter over a real server on 127.0.0.1 and an EngineClient of the tiny random model."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from lcmserve.engine.batcher import BatcherConfig
from lcmserve.engine.request import ResolvedRequest
from lcmserve.engine.sampler import LCMSampler
from lcmserve.models import load_model
from lcmserve.server.client import EngineClient, Generation
from lcmserve.server.grpc import SERVICE_NAME, build_grpc_server, pb2, pb2_grpc

PROMPT = "a red circle at the top left"


class Recorder:
    """A metrics stand-in: every observe_request call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, float]] = []

    def observe_request(self, protocol: str, endpoint: str, status: str, seconds: float) -> None:
        self.calls.append((protocol, endpoint, status, seconds))

    def statuses(self) -> list[tuple[str, str, str]]:
        return [c[:3] for c in self.calls]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


@contextlib.contextmanager
def serving(client, metrics=None):
    """A started server over ``client``; yields (stub, channel)."""
    port = free_port()
    server = build_grpc_server(client, SimpleNamespace(host="127.0.0.1", grpc_port=port), metrics)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb2_grpc.ImageGenerationStub(channel), channel
    finally:
        channel.close()
        server.stop(0)


def decode(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(int)


def trailer(error: grpc.RpcError, key: str) -> str | None:
    return dict(error.trailing_metadata() or ()).get(key)


@pytest.fixture(scope="module")
def sampler():
    return LCMSampler(load_model("preset:tiny-sd", device="cpu"))


@pytest.fixture(scope="module")
def main(sampler):
    client = EngineClient(sampler, "tiny")
    client.start()
    metrics = Recorder()
    with serving(client, metrics) as (stub, channel):
        yield SimpleNamespace(stub=stub, channel=channel, client=client, metrics=metrics)
    client.close(0)


@pytest.fixture
def slow(sampler):
    """A client whose partial batches wait a minute: requests stay queued until they fill a batch."""
    config = BatcherConfig(max_batch_size=4, max_queue_rows=4, max_queue_delay_ms=60_000)
    client = EngineClient(sampler, "tiny", config)
    client.start(warmup_steps=())
    metrics = Recorder()
    with serving(client, metrics) as (stub, channel):
        yield SimpleNamespace(stub=stub, channel=channel, client=client, metrics=metrics)
    client.close(0)


def test_generate_returns_pngs_whose_seeds_reproduce(main):
    request = pb2.GenerateRequest(prompt=PROMPT, num_images=2, steps=2, seed=7)
    first = main.stub.Generate(request, timeout=30)
    assert [i.seed for i in first.images] == [7, 8]
    assert [i.media_type for i in first.images] == ["image/png"] * 2
    assert (first.steps, first.width, first.height, first.model) == (2, 64, 64, "tiny")
    assert first.timings.total_s >= first.timings.engine_s > 0
    arrays = [decode(i) for i in first.images]
    assert arrays[0].shape == (64, 64, 3) and not np.array_equal(arrays[0], arrays[1])
    # the same request gives the same bytes; image i alone (seed + i) the same pixels, to rounding
    assert main.stub.Generate(request, timeout=30).images[0].data == first.images[0].data
    alone = main.stub.Generate(pb2.GenerateRequest(prompt=PROMPT, steps=2, seed=8), timeout=30)
    assert np.abs(decode(alone.images[0]) - arrays[1]).max() <= 1
    # no seed: the server draws one and says which
    drawn = main.stub.Generate(pb2.GenerateRequest(prompt=PROMPT, steps=1, output_format="jpeg"), timeout=30)
    assert len(drawn.images) == 1 and drawn.images[0].media_type == "image/jpeg"
    assert drawn.images[0].data[:2] == b"\xff\xd8"
    assert ("grpc", "Generate", "OK") in main.metrics.statuses()


def test_stream_sends_progress_then_images(main):
    events = list(main.stub.GenerateStream(pb2.GenerateRequest(prompt=PROMPT, steps=3, seed=1), timeout=30))
    assert events[0].WhichOneof("event") == "progress"
    assert (events[0].progress.stage, events[0].progress.step, events[0].progress.total_steps) == (
        pb2.Progress.STAGE_QUEUED, 0, 3)
    assert all(e.WhichOneof("event") == "progress" for e in events[:-1])
    result = events[-1].result
    assert [i.seed for i in result.images] == [1] and decode(result.images[0]).shape == (64, 64, 3)
    unary = main.stub.Generate(pb2.GenerateRequest(prompt=PROMPT, steps=3, seed=1), timeout=30)
    assert unary.images[0].data == result.images[0].data


class SteppingClient:
    """A model-free client that exposes the step hook GenerateStream forwards."""

    model_name, ready = "fake", True

    def submit(self, request, *, deadline=None, is_cancelled=None, on_step=None):
        resolved = ResolvedRequest(prompt=request.prompt, steps=request.steps, width=8, height=8, seed=3)
        future: Future = Future()

        def work():
            for done in range(1, resolved.steps + 1):
                on_step(done, resolved.steps)
            future.set_result(Generation(resolved, [torch.zeros(3, 8, 8)], [3], 0.0, 0.0, (1,)))

        threading.Thread(target=work).start()
        return future


def test_stream_forwards_engine_steps():
    with serving(SteppingClient()) as (stub, _):
        events = list(stub.GenerateStream(pb2.GenerateRequest(prompt="x", steps=4), timeout=10))
    steps = [(e.progress.stage, e.progress.step, e.progress.total_steps) for e in events[:-1]]
    assert steps == [(pb2.Progress.STAGE_QUEUED, 0, 4)] + [(pb2.Progress.STAGE_STEP, i, 4) for i in range(1, 5)]
    assert events[-1].result.images[0].seed == 3


@pytest.mark.parametrize("field, fields", [
    ("steps", {"steps": 0}),
    ("width", {"width": 65}),
    ("guidance_scale", {"guidance_scale": -1.0}),
    ("output_format", {"output_format": "gif"}),
])
def test_invalid_argument_names_the_field(main, field, fields):
    with pytest.raises(grpc.RpcError) as info:
        main.stub.Generate(pb2.GenerateRequest(prompt=PROMPT, **fields), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    assert trailer(info.value, "lcmserve-error-param") == field
    assert trailer(info.value, "lcmserve-error-type") == "invalid_request"
    with pytest.raises(grpc.RpcError) as info:
        list(main.stub.GenerateStream(pb2.GenerateRequest(prompt=PROMPT, **fields), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


def test_unknown_errors_are_internal():
    broken = SimpleNamespace(model_name="fake", ready=True, submit=lambda *a, **k: 1 / 0)
    with serving(broken) as (stub, _), pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb2.GenerateRequest(prompt="x"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in info.value.details()


def test_deadline_shorter_than_queue_wait(slow):
    with pytest.raises(grpc.RpcError) as info:
        slow.stub.Generate(pb2.GenerateRequest(prompt=PROMPT, steps=1), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server saw it as a deadline too, and the request never reached the engine
    wait_for(lambda: ("grpc", "Generate", "DEADLINE_EXCEEDED") in slow.metrics.statuses())
    wait_for(lambda: slow.client.batcher.stats().failures.get("deadline_exceeded") == 1)
    stats = slow.client.batcher.stats()
    assert stats.rows_run == 0 and stats.queued_rows == 0


def test_queue_full_then_cancel_frees_the_slot(slow):
    waiting = slow.stub.Generate.future(pb2.GenerateRequest(prompt=PROMPT, num_images=3, steps=1), timeout=30)
    wait_for(lambda: slow.client.batcher.stats().queued_rows == 3)
    # 1. 3 + 2 rows > max_queue_rows=4
    with pytest.raises(grpc.RpcError) as info:
        slow.stub.Generate(pb2.GenerateRequest(prompt=PROMPT, num_images=2, steps=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in info.value.details() and int(trailer(info.value, "retry-after")) >= 1
    # 2. cancelling the waiting call frees its rows; it never runs
    assert waiting.cancel()
    wait_for(lambda: slow.client.batcher.stats().queued_rows == 0)
    full = slow.stub.Generate(pb2.GenerateRequest(prompt=PROMPT, num_images=4, steps=1, seed=0), timeout=30)
    assert [i.seed for i in full.images] == [0, 1, 2, 3]
    stats = slow.client.batcher.stats()
    assert stats.rows_run == 4 and stats.failures.get("cancelled") == 1
    wait_for(lambda: ("grpc", "Generate", "CANCELLED") in slow.metrics.statuses())
    assert ("grpc", "Generate", "RESOURCE_EXHAUSTED") in slow.metrics.statuses()


def test_cancelled_stream_frees_its_rows(slow):
    stream = slow.stub.GenerateStream(pb2.GenerateRequest(prompt=PROMPT, num_images=3, steps=1), timeout=30)
    assert next(stream).progress.stage == pb2.Progress.STAGE_QUEUED
    assert slow.client.batcher.stats().queued_rows == 3
    stream.cancel()
    wait_for(lambda: slow.client.batcher.stats().queued_rows == 0)
    wait_for(lambda: slow.client.batcher.stats().failures.get("cancelled") == 1)
    wait_for(lambda: ("grpc", "GenerateStream", "CANCELLED") in slow.metrics.statuses())
    assert slow.client.batcher.stats().rows_run == 0


def test_health_and_reflection(main):
    health = health_pb2_grpc.HealthStub(main.channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(main.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_drain_makes_calls_unavailable(sampler):
    client = EngineClient(sampler, "tiny")
    client.start(warmup_steps=())
    try:
        with serving(client) as (stub, channel):
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            client.drain()
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb2.GenerateRequest(prompt=PROMPT, steps=1), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert trailer(info.value, "lcmserve-error-type") == "unavailable"
    finally:
        client.close(0)
