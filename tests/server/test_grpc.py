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
from lcmserve.engine.request import GenerationRequest, ResolvedRequest
from lcmserve.engine.sampler import LCMSampler
from lcmserve.models import load_model
from lcmserve.server.client import EngineClient, Generation, StepEvent
from lcmserve.server.config import ServerConfig
from lcmserve.server.grpc import SERVICE_NAME, build_grpc_server, pb2, pb2_grpc
from conftest import FailingSampler

PROMPT = "a red circle at the top left"
API_KEY = "grpc-key-1"


class Recorder:
    """A metrics stand-in: every observe_request and on_failure call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, float]] = []
        self.failures: list[str] = []

    def observe_request(self, protocol: str, endpoint: str, status: str, seconds: float) -> None:
        self.calls.append((protocol, endpoint, status, seconds))

    def on_failure(self, error_type: str) -> None:
        self.failures.append(error_type)

    def track_in_flight(self, protocol: str):
        return contextlib.nullcontext()

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
def serving(client, metrics=None, api_key=None):
    """A started server over ``client``; yields (stub, channel)."""
    port = free_port()
    server = build_grpc_server(client, ServerConfig(host="127.0.0.1", grpc_port=port, api_key=api_key), metrics)
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


def block_means(pixels: np.ndarray, block: int = 8) -> np.ndarray:
    """Mean colour of each block x block tile: what a low-quality JPEG keeps of an image."""
    h, w, c = pixels.shape
    return pixels.reshape(h // block, block, w // block, block, c).mean(axis=(1, 3))


def test_stream_sends_a_preview_per_step_then_the_images(main):
    request = pb2.GenerateRequest(prompt=PROMPT, num_images=2, steps=4, seed=1)
    events = list(main.stub.GenerateStream(request, timeout=30))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 5 + ["result"]
    queued, steps, result = events[0].progress, [e.progress for e in events[1:5]], events[-1].result
    assert (queued.stage, queued.step, queued.total_steps, len(queued.previews)) == (pb2.Progress.STAGE_QUEUED, 0, 4, 0)
    assert [(p.stage, p.step, p.total_steps, p.first_image, p.num_images) for p in steps] == [
        (pb2.Progress.STAGE_STEP, i, 4, 0, 2) for i in range(1, 5)]
    for progress in steps:
        assert [(i.seed, i.media_type) for i in progress.previews] == [(1, "image/jpeg"), (2, "image/jpeg")]
        assert all(i.data[:2] == b"\xff\xd8" and decode(i).shape == (64, 64, 3) for i in progress.previews)
    # the last step's estimate is the final image, as far as a quality-50 JPEG keeps it: close
    # to its own image, far from the other one
    assert [i.seed for i in result.images] == [1, 2]
    finals = [block_means(decode(image)) for image in result.images]
    for k in range(2):
        preview = block_means(decode(steps[-1].previews[k]))
        own, other = np.abs(preview - finals[k]).mean(), np.abs(preview - finals[1 - k]).mean()
        assert own <= 6 and own < other / 2, (own, other)
    assert not np.array_equal(decode(steps[0].previews[0]), decode(steps[-1].previews[0]))
    # previews change nothing about the images themselves
    unary = main.stub.Generate(request, timeout=30)
    assert [i.data for i in unary.images] == [i.data for i in result.images]
    # previews=false: the same steps, without images
    quiet = list(main.stub.GenerateStream(pb2.GenerateRequest(prompt=PROMPT, steps=2, seed=1, previews=False),
                                          timeout=30))
    assert [(e.progress.step, len(e.progress.previews)) for e in quiet[:-1]] == [(0, 0), (1, 0), (2, 0)]


def test_previews_are_decoded_for_the_asking_rows_only(sampler):
    """One batch: a request with previews (2 rows) beside one without (1 row); the VAE sees 2 rows a step."""
    config = BatcherConfig(max_batch_size=3, max_queue_rows=3, max_queue_delay_ms=60_000)
    client = EngineClient(sampler, "tiny", config)
    decoded: list[int] = []
    decode_previews = client.decode_previews
    client.decode_previews = lambda latents: decoded.append(len(latents)) or decode_previews(latents)
    events: list[StepEvent] = []
    client.start(warmup_steps=())
    try:
        asking = client.submit(GenerationRequest(PROMPT, num_images=2, steps=3, seed=5), on_step=events.append,
                               previews=True)
        plain = client.submit(GenerationRequest(PROMPT, steps=3, seed=9))  # fills the batch: it goes now
        generation, alone = asking.result(30), plain.result(30)
    finally:
        client.close(0)
    assert generation.batch_sizes == alone.batch_sizes == (3,)
    assert decoded == [2, 2, 2]
    # preview_steps: the decode runs at those steps only; the other step events carry no previews
    client = EngineClient(sampler, "tiny", BatcherConfig(max_queue_delay_ms=0))
    client.decode_previews = lambda latents: decoded.append(len(latents)) or decode_previews(latents)
    decoded.clear()
    some: list[StepEvent] = []
    client.start(warmup_steps=())
    try:
        client.submit(GenerationRequest(PROMPT, steps=3, seed=5), on_step=some.append, previews=True,
                      preview_steps={2}).result(30)
    finally:
        client.close(0)
    assert decoded == [1] and [e.previews is not None for e in some] == [False, True, False]
    assert [(e.step, e.total_steps, e.first_image, e.num_images, e.seeds) for e in events] == [
        (i, 3, 0, 2, (5, 6)) for i in range(1, 4)]
    # the last preview is the final image, before encoding
    for preview, image in zip(events[-1].previews, generation.images):
        assert torch.allclose(preview, image, atol=1e-4)


class SteppingClient:
    """A model-free client that reports steps (and previews when asked) like EngineClient."""

    model_name, ready = "fake", True
    sampler = SimpleNamespace(model=SimpleNamespace(native_size=8))

    def submit(self, request, *, deadline=None, is_cancelled=None, on_step=None, previews=False):
        resolved = ResolvedRequest(prompt=request.prompt, num_images=2, steps=request.steps, width=8, height=8,
                                   seed=3)
        future: Future = Future()

        def work():
            for first in (0, 1):  # as if the request ran in two batches of one row
                for done in range(1, resolved.steps + 1):
                    images = [torch.full((3, 8, 8), done / resolved.steps)] if previews else None
                    on_step(StepEvent(done, resolved.steps, first, 1, (3 + first,), images))
            future.set_result(Generation(resolved, [torch.zeros(3, 8, 8)] * 2, [3, 4], 0.0, 0.0, (1, 1)))

        threading.Thread(target=work).start()
        return future


def test_stream_forwards_engine_steps():
    with serving(SteppingClient()) as (stub, _):
        events = list(stub.GenerateStream(pb2.GenerateRequest(prompt="x", steps=2), timeout=10))
    steps = [(e.progress.stage, e.progress.step, e.progress.total_steps, e.progress.first_image,
              [i.seed for i in e.progress.previews]) for e in events[:-1]]
    assert steps == [(pb2.Progress.STAGE_QUEUED, 0, 2, 0, [])] + [
        (pb2.Progress.STAGE_STEP, i, 2, first, [3 + first]) for first in (0, 1) for i in (1, 2)]
    # the preview shows the step's image: grey 0.5 after step 1 of 2, white after step 2
    assert decode(events[1].progress.previews[0]).mean() == pytest.approx(128, abs=2)
    assert decode(events[2].progress.previews[0]).mean() == pytest.approx(255, abs=2)
    assert [i.seed for i in events[-1].result.images] == [3, 4]


@pytest.mark.parametrize("field, fields", [
    ("steps", {"steps": 0}),
    ("width", {"width": 65}),
    ("guidance_scale", {"guidance_scale": -1.0}),
    ("output_format", {"output_format": "gif"}),
    ("negative_prompt", {"negative_prompt": "a dog"}),  # the tiny LCM takes guidance as an embedding
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
    assert main.metrics.failures[-2:] == ["invalid_request", "invalid_request"]


def test_api_key_guards_every_image_generation_rpc_but_not_health(main):
    metrics = Recorder()
    with serving(main.client, metrics, api_key=API_KEY) as (stub, channel):
        request = pb2.GenerateRequest(prompt=PROMPT, steps=1, seed=0)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", API_KEY),),
                         (("authorization", f"Basic {API_KEY}"),)):
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, timeout=10, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer <key>" in info.value.details()
                assert trailer(info.value, "lcmserve-error-type") == "unauthorized"
                assert trailer(info.value, "lcmserve-error-param") == "authorization"
                assert trailer(info.value, "www-authenticate") == "Bearer"
        good = (("authorization", f"Bearer {API_KEY}"),)
        assert stub.Generate(request, timeout=30, metadata=good).images[0].seed == 0
        assert list(stub.GenerateStream(request, timeout=30, metadata=good))[-1].result.images[0].seed == 0
        health = health_pb2_grpc.HealthStub(channel)  # open without a key, like /healthz
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING)
        with pytest.raises(grpc.RpcError) as info:  # keyed too, like GET /v1/models
            stub.GetModel(pb2.GetModelRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.GetModel(pb2.GetModelRequest(), timeout=5, metadata=good)
        assert (info.id, info.guidance_mode, info.default_guidance_scale, info.native_size, info.lora,
                info.max_prompt_tokens) == ("tiny", "embedding", 8.0, 64, "", 77)
    assert ("grpc", "Generate", "UNAUTHENTICATED") in metrics.statuses()
    assert ("grpc", "GetModel", "UNAUTHENTICATED") in metrics.statuses()
    assert ("grpc", "GetModel", "OK") in metrics.statuses()
    assert metrics.failures.count("unauthorized") == 9


def test_failing_batch_is_internal_and_the_next_call_succeeds(sampler):
    client = EngineClient(FailingSampler(sampler), "tiny", BatcherConfig(max_queue_delay_ms=0))
    client.start(warmup_steps=())
    metrics = Recorder()
    try:
        with serving(client, metrics) as (stub, _):
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as info:
                    call(pb2.GenerateRequest(prompt="boom", steps=1), timeout=30)
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert "illegal memory access" in info.value.details()
                assert trailer(info.value, "lcmserve-error-type") == "internal_error"
                assert stub.Generate(pb2.GenerateRequest(prompt=PROMPT, steps=1, seed=2), timeout=30).images
    finally:
        client.close(0)
    assert client.batcher.stats().failures == {"internal_error": 2}
    assert [s for s in metrics.statuses() if s[2] == "INTERNAL"] == [
        ("grpc", "Generate", "INTERNAL"), ("grpc", "GenerateStream", "INTERNAL")]


def test_server_limits_apply_as_on_rest(main):
    port = free_port()
    server = build_grpc_server(main.client, ServerConfig(host="127.0.0.1", grpc_port=port, max_prompt_chars=10,
                                                         max_pixels=64 * 64))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb2_grpc.ImageGenerationStub(channel)
            for fields, param, text in (({"prompt": "x" * 11}, "prompt", "max_prompt_chars=10"),
                                        ({"prompt": "x", "width": 72}, "width", "max_pixels=4096")):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Generate(pb2.GenerateRequest(steps=1, **fields), timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details()
                assert trailer(info.value, "lcmserve-error-param") == param
            assert stub.Generate(pb2.GenerateRequest(prompt="x" * 10, steps=1), timeout=30).width == 64
    finally:
        server.stop(0)


def test_unknown_errors_are_internal():
    broken = SimpleNamespace(model_name="fake", ready=True, sampler=SteppingClient.sampler,
                             submit=lambda *a, **k: 1 / 0)
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


def test_negative_prompt_reaches_a_classifier_free_guidance_model():
    """A base model (LCM-LoRA style): the negative prompt travels to the engine and changes the guided image;
    a request without a guidance scale gets the model's default."""
    import torch

    from lcmserve.engine import GenerationRequest
    from lcmserve.models.loading import _to_lcm_model
    from lcmserve.models.presets import build_preset_pipeline

    model = _to_lcm_model(build_preset_pipeline("tiny-sd", lcm=False, seed=2), "tiny-base", "tiny-lora",
                          torch.device("cpu"))  # a base model standing in for one with a fused LoRA of that name
    sampler = LCMSampler(model)
    client = EngineClient(sampler, "tiny-base")
    client.start(warmup_steps=())
    try:
        with serving(client) as (stub, _):
            ask = {"prompt": PROMPT, "steps": 2, "seed": 3, "guidance_scale": 6.0}
            negative = stub.Generate(pb2.GenerateRequest(negative_prompt="a dog", **ask), timeout=30).images[0]
            plain = stub.Generate(pb2.GenerateRequest(**ask), timeout=30).images[0]
            default = stub.Generate(pb2.GenerateRequest(prompt=PROMPT, steps=1), timeout=30)
            info = stub.GetModel(pb2.GetModelRequest(), timeout=5)
    finally:
        client.close(0)
    assert default.guidance_scale == 1.0  # none given: an LCM-LoRA's default
    assert (info.guidance_mode, info.default_guidance_scale, info.lora) == ("cfg", 1.0, "tiny-lora")
    expected = sampler.generate(GenerationRequest(negative_prompt="a dog", **ask)).to_pil()[0]
    assert np.abs(decode(negative) - np.asarray(expected).astype(int)).max() <= 1
    assert np.abs(decode(negative) - decode(plain)).max() > 1  # without it the two are the same bytes
