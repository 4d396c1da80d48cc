"""The REST server end to end: real uvicorn processes on 127.0.0.1 serving preset:tiny-sd.

Three servers start together (their start-up is the slow part): ``main`` (API key, small
limits), ``slow`` (a 4-row queue whose batches wait 3 s and a 1 s deadline: 429 and 504) and
``drain`` (stopped by SIGTERM in its test). One more test runs schemathesis in-process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lcmserve.errors import InvalidInputError
from lcmserve.server.config import ServerConfig
from conftest import FailingSampler

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m lcmserve.cli serve`` on a free loopback port, its log in a file."""

    def __init__(self, log_dir: Path, name: str, *flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LCMSERVE_GRPC_PORT": "0"}
        cmd = [sys.executable, "-m", "lcmserve.cli", "serve", "--model", "preset:tiny-sd", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready after {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("servers")
    started = {
        "main": ServerProcess(log_dir, "main", "--api-key", API_KEY, "--max-images", "4", "--max-body-bytes", "4096",
                              "--max-prompt-chars", "300", "--max-pixels", "9216", "--warmup-steps", "1",
                              "--max-queue-delay-ms", "5", "--cors-origins", "http://example.test"),
        "slow": ServerProcess(log_dir, "slow", "--max-batch-size", "4", "--max-queue-rows", "4",
                              "--max-queue-delay-ms", "3000", "--request-timeout-s", "1", "--warmup-steps", ""),
        "drain": ServerProcess(log_dir, "drain", "--max-batch-size", "2", "--max-queue-delay-ms", "50",
                               "--warmup-steps", "1", "--drain-grace-s", "60"),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def http(main):
    with httpx.Client(base_url=main.url, timeout=60) as client:
        yield client


def _png_pixels(data: bytes) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB").tobytes()


def _assert_error(response: httpx.Response, status: int, error_type: str, param: str | None) -> dict:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    assert body["error"]["type"] == error_type, body
    assert body["error"]["param"] == param, body
    assert body["error"]["message"]
    return body["error"]


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total, found = total + float(value), True
    assert found, f"{name} {labels} not in /metrics"
    return total


# 1. routes ----------------------------------------------------------------------------------------
def test_operational_routes(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready", "model": "preset:tiny-sd"}
    _assert_error(http.get("/v1/models"), 401, "unauthorized", "Authorization")  # like OpenAI's, it takes the key
    models = http.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "preset:tiny-sd"
    card = models["data"][0]  # lcmserve's fields: what a request may ask of this model
    assert (card["guidance_mode"], card["default_guidance_scale"], card["native_size"]) == ("embedding", 8.0, 64)
    assert card["max_prompt_tokens"] == 77
    assert card["lora"] is None
    # how it runs (REST only: gRPC's ModelInfo has no field for it); a reason only when backend auto picked it
    assert (card["backend"], card["dtype"], card["attention"], card["backend_reason"]) == (
        "torch", "float32", "sdpa", None)
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # the page's script and style come from this server (no CDN), the script posts to /generate/stream
    assets = re.findall(r'(?:src|href)="(/[^"]*\.(?:js|css))"', page.text)
    assert len(assets) == 3 and all(http.get(a).status_code == 200 for a in assets), assets
    script = "".join(http.get(a).text for a in assets if a.endswith(".js"))
    assert "Generate" in page.text and "/generate/stream" in script and "http" not in script
    assert '"model": "preset:tiny-sd"' in script and '"max_images": 4' in script
    schema = http.get("/openapi.json").json()
    assert {"/generate", "/v1/images/generations", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(
        schema["paths"])
    assert http.get("/docs").status_code == 200
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")
    cors = http.options("/generate", headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"})
    assert cors.headers.get("access-control-allow-origin") == "http://example.test"


def test_generate_json_seeds_are_returned_and_reproducible(http):
    out = http.post("/generate", headers=AUTH, json={"prompt": "a red circle", "num_images": 2, "steps": 2,
                                                      "seed": 7}).json()
    assert [image["seed"] for image in out["images"]] == [7, 8]
    assert (out["width"], out["height"], out["steps"], out["output_format"]) == (64, 64, 2, "png")
    assert out["guidance_scale"] == 8.0  # none given: a distilled LCM's default
    assert out["timings"]["total_s"] >= out["timings"]["engine_s"] > 0
    alone = http.post("/generate", headers=AUTH, json={"prompt": "a red circle", "steps": 2, "seed": 8}).json()
    second = np.frombuffer(_png_pixels(base64.b64decode(out["images"][1]["b64"])), np.uint8).astype(int)
    # the same image alone as in the batch, to float rounding: the CPU's matrix kernels block a batch of 2
    # differently from a batch of 1, and a value on a rounding edge may land one 8-bit level apart
    again = np.frombuffer(_png_pixels(base64.b64decode(alone["images"][0]["b64"])), np.uint8).astype(int)
    assert np.abs(again - second).max() <= 1 and (again != second).mean() < 1e-3
    first = np.frombuffer(_png_pixels(base64.b64decode(out["images"][0]["b64"])), np.uint8).astype(int)
    assert np.abs(first - second).mean() > 1
    # seed null draws one and returns it; that seed reproduces the image
    drawn = http.post("/generate", headers=AUTH, json={"prompt": "x", "steps": 1, "seed": None}).json()
    seed = drawn["images"][0]["seed"]
    again = http.post("/generate", headers=AUTH, json={"prompt": "x", "steps": 1, "seed": seed}).json()
    assert again["images"][0]["b64"] == drawn["images"][0]["b64"]


def test_generate_raw_image(http):
    png = http.post("/generate", headers={**AUTH, "Accept": "image/png"}, json={"prompt": "x", "steps": 1, "seed": 3})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-seed"] == "3" and png.content.startswith(b"\x89PNG")
    jpeg = http.post("/generate", headers={**AUTH, "Accept": "image/jpeg"}, json={"prompt": "x", "steps": 1})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content.startswith(b"\xff\xd8")
    webp = http.post("/generate", headers={**AUTH, "Accept": "image/*"},
                     json={"prompt": "x", "steps": 1, "output_format": "webp"})
    assert webp.headers["content-type"] == "image/webp" and webp.content[8:12] == b"WEBP"
    two = http.post("/generate", headers={**AUTH, "Accept": "image/png"}, json={"prompt": "x", "num_images": 2})
    _assert_error(two, 422, "invalid_request", "num_images")


def _sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body."""
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_generate_stream_sends_steps_with_previews_then_the_result(http):
    body = {"prompt": "a red circle", "num_images": 2, "steps": 3, "seed": 11}
    with http.stream("POST", "/generate/stream", headers=AUTH, json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        response.read()
    events = _sse_events(response)
    assert [name for name, _ in events] == ["queued", "step", "step", "step", "result"]
    assert events[0][1] == {"step": 0, "total_steps": 3}
    for i, (_, step) in enumerate(events[1:4], 1):
        assert (step["step"], step["total_steps"], step["first_image"], step["num_images"]) == (i, 3, 0, 2)
        assert [pv["seed"] for pv in step["previews"]] == [11, 12]
        assert all(base64.b64decode(pv["b64"])[:2] == b"\xff\xd8" for pv in step["previews"])  # JPEG
    result = events[-1][1]
    assert [image["seed"] for image in result["images"]] == [11, 12] and result["steps"] == 3
    # the same images as /generate gives for the same request (same batch size: to the bit)
    plain = http.post("/generate", headers=AUTH, json=body).json()
    assert [image["b64"] for image in plain["images"]] == [image["b64"] for image in result["images"]]
    # the last step's preview is the final image, as far as a quality-50 JPEG keeps it (mean colours of
    # 8x8 tiles): close to its own image, far from the other one
    def tiles(b64: str) -> np.ndarray:
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), float)
        return pixels.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

    finals = [tiles(image["b64"]) for image in result["images"]]
    for k in range(2):
        preview = tiles(events[3][1]["previews"][k]["b64"])
        own, other = np.abs(preview - finals[k]).mean(), np.abs(preview - finals[1 - k]).mean()
        assert own <= 6 and own < other / 2, (own, other)
    # previews=false: the same events, no pictures
    with http.stream("POST", "/generate/stream", headers=AUTH, json={**body, "previews": False}) as quiet:
        quiet.read()
    assert [(name, data.get("previews")) for name, data in _sse_events(quiet)[1:4]] == [("step", [])] * 3


def test_generate_stream_errors(http, servers):
    bad = http.post("/generate/stream", headers=AUTH, json={"prompt": "x", "steps": 9})
    _assert_error(bad, 422, "invalid_request", "steps")  # a bad request fails before the stream starts
    _assert_error(http.post("/generate/stream", json={"prompt": "x"}), 401, "unauthorized", "Authorization")
    # past its deadline in the queue (partial batches wait 3 s there): the error is the stream's last event
    response = httpx.post(servers["slow"].url + "/generate/stream", json={"prompt": "x", "timeout_s": 0.3},
                          timeout=30)
    assert response.status_code == 200
    events = _sse_events(response)
    assert [name for name, _ in events] == ["queued", "error"]
    assert events[-1][1]["error"]["type"] == "deadline_exceeded"
    # a client that leaves mid-stream frees its queued rows (3 of the slow server's 4)
    with httpx.stream("POST", servers["slow"].url + "/generate/stream", json={"prompt": "x", "num_images": 3},
                      timeout=30) as leaving:
        assert next(leaving.iter_lines()) == "event: queued"
    time.sleep(0.3)
    response = httpx.post(servers["slow"].url + "/generate", json={"prompt": "x", "num_images": 3}, timeout=30)
    _assert_error(response, 504, "deadline_exceeded", None)  # not 429: the rows of the stream are gone


def test_openai_client(main):
    from openai import OpenAI

    client = OpenAI(base_url=main.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    result = client.images.generate(prompt="a blue square", n=2, size="64x64", response_format="b64_json",
                                    model="preset:tiny-sd", extra_body={"steps": 2, "seed": 11})
    assert result.created > 0 and len(result.data) == 2
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64)
    assert [m.id for m in client.models.list()] == ["preset:tiny-sd"]
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.images.generate(prompt="x", response_format="url")
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=main.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_openai_client_streams_partial_images(main, servers):
    """OpenAI's streaming image events through OpenAI's own SDK: partial images, then the completed ones."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=main.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    extra = {"steps": 4, "seed": 21}
    events = list(client.images.generate(prompt="a blue square", n=2, size="64x64", stream=True, partial_images=2,
                                         extra_body=extra))
    kinds = [event.type for event in events]
    # steps 2 and 3 of 4 give the partial images (the 4th is the finished image), for both images
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    partials = [(e.image_index, e.partial_image_index, e.seed) for e in events[:4]]
    assert partials == [(0, 0, 21), (1, 0, 22), (0, 1, 21), (1, 1, 22)]
    assert all(base64.b64decode(e.b64_json)[:2] == b"\xff\xd8" and e.output_format == "jpeg" for e in events[:4])
    completed = events[4:]
    assert [(e.image_index, e.seed, e.size, e.output_format) for e in completed] == [
        (0, 21, "64x64", "png"), (1, 22, "64x64", "png")]
    # the completed images are the ones the plain request returns
    plain = client.images.generate(prompt="a blue square", n=2, size="64x64", extra_body=extra)
    assert [e.b64_json for e in completed] == [d.b64_json for d in plain.data]
    # partial_images=0: the completed images alone
    quiet = list(client.images.generate(prompt="a blue square", size="64x64", stream=True, extra_body=extra))
    assert [e.type for e in quiet] == ["image_generation.completed"]
    with pytest.raises(openai.UnprocessableEntityError) as info:  # OpenAI's own limit, 0-3
        list(client.images.generate(prompt="x", stream=True, partial_images=4))
    assert info.value.body["param"] == "partial_images"
    # an error once the stream runs reaches the SDK as an APIError with the server's message
    slow = OpenAI(base_url=servers["slow"].url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match="deadline passed"):
        list(slow.images.generate(prompt="x", stream=True, extra_body={"timeout_s": 0.3}))


def test_partial_image_steps_spread_over_the_intermediate_steps():
    from lcmserve.server.protocol import partial_image_steps

    assert partial_image_steps(4, 0) == set() and partial_image_steps(1, 3) == set()
    assert partial_image_steps(4, 1) == {3} and partial_image_steps(4, 2) == {2, 3}
    assert partial_image_steps(4, 3) == {1, 2, 3} and partial_image_steps(2, 3) == {1}
    assert partial_image_steps(8, 3) == {2, 5, 7} and partial_image_steps(8, 2) == {4, 7}


# 2. errors -------------------------------------------------------------------------------------------
BAD_GENERATE = [
    ({"prompt": "x", "steps": 9}, "steps"),
    ({"prompt": "x", "steps": "4"}, "steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "width": 65}, "width"),
    ({"prompt": "x", "width": 0}, "width"),
    ({"prompt": "x", "width": 4096}, "width"),
    ({"prompt": "x", "width": 128, "height": 128}, "width"),  # over max_pixels=9216
    ({"prompt": "x", "num_images": 5}, "num_images"),  # over max_images=4
    ({"prompt": "x", "num_images": 0}, "num_images"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x" * 301}, "prompt"),  # over max_prompt_chars=300
    ({"prompt": "a\x00b"}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"steps": 4}, "prompt"),
    ({"prompt": "x", "negative": "y"}, "negative"),
    ({"prompt": "x", "negative_prompt": "y"}, "negative_prompt"),  # the model takes guidance as an embedding
    ({"prompt": "x", "negative_prompt": "x" * 301}, "negative_prompt"),
    ({"prompt": "x", "negative_prompt": 3}, "negative_prompt"),
    ({"prompt": "x", "timeout_s": 0}, "timeout_s"),
    ({"prompt": "x", "timeout_s": "5"}, "timeout_s"),
    ({"prompt": "x", "timeout_s": 61.0}, "timeout_s"),  # over the server's request_timeout_s=60
]


@pytest.mark.parametrize(("body", "param"), BAD_GENERATE, ids=[p for _, p in BAD_GENERATE])
def test_generate_rejects_bad_values(http, body, param):
    _assert_error(http.post("/generate", headers=AUTH, json=body), 422, "invalid_request", param)


@pytest.mark.parametrize(("content", "param"), [(b'{"prompt": ', "body"), (b"[1, 2]", "body"), (b"", "body")])
def test_generate_rejects_malformed_bodies(http, content, param):
    response = http.post("/generate", headers={**AUTH, "Content-Type": "application/json"}, content=content)
    _assert_error(response, 422, "invalid_request", param)


@pytest.mark.parametrize("size", ["0x0", "99999x99999", "64", "64x65", "big", "128x128"])
def test_openai_rejects_impossible_sizes(http, size):
    response = http.post("/v1/images/generations", headers=AUTH, json={"prompt": "x", "size": size})
    assert "size" in _assert_error(response, 422, "invalid_request", "size")["message"]


def test_openai_rejects_bad_fields(http):
    _assert_error(http.post("/v1/images/generations", headers=AUTH, json={"prompt": "x", "n": 5}),
                  422, "invalid_request", "n")
    _assert_error(http.post("/v1/images/generations", headers=AUTH, json={"prompt": "x", "model": "dall-e-3"}),
                  422, "invalid_request", "model")
    _assert_error(http.post("/v1/images/generations", headers=AUTH, json={"prompt": "x", "quality": "hd"}),
                  422, "invalid_request", "quality")
    body = {"prompt": "x", "negative_prompt": "y"}  # an lcmserve extension; this model has no negative branch
    _assert_error(http.post("/v1/images/generations", headers=AUTH, json=body), 422, "invalid_request",
                  "negative_prompt")


def test_body_too_large(http):
    response = http.post("/generate", headers=AUTH, json={"prompt": "x" * 10_000})
    assert "max_body_bytes" in _assert_error(response, 413, "invalid_request", "body")["message"]


def test_api_key(http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        for path in ("/generate", "/v1/images/generations"):
            response = http.post(path, headers=headers, json={"prompt": "x"})
            _assert_error(response, 401, "unauthorized", "Authorization")
            assert response.headers["www-authenticate"] == "Bearer"
    assert http.get("/metrics").status_code == 200 and http.get("/healthz").status_code == 200


def test_unknown_route_and_method(http):
    _assert_error(http.get("/nope"), 404, "not_found", None)
    _assert_error(http.get("/generate"), 405, "method_not_allowed", None)


def test_overloaded_429_then_deadline_504(servers):
    slow = servers["slow"].url
    results = {}

    def first() -> None:  # 3 of the 4 queue rows; its batch would wait 3 s for mates, past its 1 s deadline
        results["first"] = httpx.post(slow + "/generate", json={"prompt": "x", "num_images": 3}, timeout=30)

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(0.4)
    refused = httpx.post(slow + "/generate", json={"prompt": "y", "num_images": 2}, timeout=30)
    _assert_error(refused, 429, "overloaded", None)
    assert int(refused.headers["retry-after"]) >= 1
    thread.join(30)
    _assert_error(results["first"], 504, "deadline_exceeded", None)


def test_request_timeout_s_is_the_deadline(servers):
    slow = servers["slow"].url  # partial batches wait 3 s; the server's own deadline is 1 s
    for path in ("/generate", "/v1/images/generations"):
        started = time.monotonic()
        response = httpx.post(slow + path, json={"prompt": "x", "timeout_s": 0.3}, timeout=30)
        elapsed_s = time.monotonic() - started
        assert "deadline passed" in _assert_error(response, 504, "deadline_exceeded", None)["message"]
        assert 0.3 <= elapsed_s < 0.9, elapsed_s  # its own deadline, not the server's 1 s
    too_long = httpx.post(slow + "/generate", json={"prompt": "x", "timeout_s": 2}, timeout=30)
    assert "request_timeout_s" in _assert_error(too_long, 422, "invalid_request", "timeout_s")["message"]


def test_disconnected_client_frees_its_rows(servers):
    slow = servers["slow"].url
    with pytest.raises(httpx.ReadTimeout):  # 3 of the 4 queue rows wait for mates; then this client goes away
        httpx.post(slow + "/generate", json={"prompt": "x", "num_images": 3}, timeout=0.3)
    time.sleep(0.3)
    # without the disconnect its rows would hold the queue until its 1 s deadline: this would be 429
    response = httpx.post(slow + "/generate", json={"prompt": "x", "num_images": 3}, timeout=30)
    _assert_error(response, 504, "deadline_exceeded", None)
    assert _metric(httpx.get(slow + "/metrics").text, "lcmserve_failures_total", type="cancelled") >= 1


def test_metrics_after_requests(http):
    http.post("/generate", headers=AUTH, json={"prompt": "m", "num_images": 2, "steps": 1})
    http.post("/generate", headers=AUTH, json={"prompt": "m", "steps": 0})
    http.post("/generate", json={"prompt": "m"})
    text = http.get("/metrics").text
    assert _metric(text, "lcmserve_request_duration_seconds_count", protocol="http", endpoint="/generate",
                   status="200") >= 1
    assert _metric(text, "lcmserve_request_duration_seconds_count", endpoint="/generate", status="422") >= 1
    assert _metric(text, "lcmserve_queue_wait_seconds_count") >= 1
    for stage in ("text", "unet", "vae"):
        assert _metric(text, "lcmserve_inference_seconds_count", stage=stage) >= 1
    assert _metric(text, "lcmserve_batch_size_rows_count") >= 1
    assert _metric(text, "lcmserve_images_generated_total") >= 2
    assert _metric(text, "lcmserve_requests_in_flight", protocol="http") >= 1  # this scrape
    assert _metric(text, "lcmserve_queue_depth_rows") == 0
    assert _metric(text, "lcmserve_ready") == 1
    assert _metric(text, "lcmserve_failures_total", type="invalid_request") >= 1
    assert _metric(text, "lcmserve_failures_total", type="unauthorized") >= 1
    assert _metric(text, "lcmserve_model_info", lcmserve_model="preset:tiny-sd") == 1
    assert 'le="0.01"' in text and 'le="60.0"' in text


# 3. shutdown ----------------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_then_exits_0(servers):
    server = servers["drain"]
    results: list[httpx.Response] = []

    def call() -> None:
        # big enough that the three are still running after the signal, even on a fast idle machine
        results.append(httpx.post(server.url + "/generate", timeout=120,
                                  json={"prompt": "drain", "num_images": 4, "steps": 8, "width": 128, "height": 128}))

    done_before = _metric(httpx.get(server.url + "/metrics").text, "lcmserve_images_generated_total")  # warm-up
    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    # All three are accepted by the engine before the signal, and work is still queued. A request can be in
    # the HTTP handler before the engine takes it (then the drain answers 503), so the wait counts rows: the
    # twelve rows minus the two of a running batch, queued or done. A slow machine gets a long wait, and a
    # wait that runs out fails here rather than as a 503 further down.
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(server.url + "/metrics").text
        queued = _metric(text, "lcmserve_queue_depth_rows")
        accepted = queued + _metric(text, "lcmserve_images_generated_total") - done_before
        if accepted >= 10 and queued >= 2:
            break
        assert time.monotonic() < deadline, f"{accepted} of 12 rows accepted, {queued} queued, after 60 s"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    _assert_error(httpx.get(server.url + "/readyz"), 503, "unavailable", None)
    _assert_error(httpx.post(server.url + "/generate", json={"prompt": "late"}), 503, "unavailable", None)
    for thread in threads:
        thread.join(60)
    assert [r.status_code for r in results] == [200, 200, 200], [r.text[:200] for r in results]
    assert all(len(r.json()["images"]) == 4 for r in results)
    assert server.proc.wait(30) == 0, server.log.read_text()[-3000:]


# 3b. engine faults, on uvicorn in this process (the engine is wrapped to fail on demand) ----------------
def test_failing_batch_is_500_and_the_next_request_succeeds():
    import uvicorn

    from lcmserve.engine.sampler import LCMSampler
    from lcmserve.models import load_model
    from lcmserve.server.client import EngineClient
    from lcmserve.server.metrics import ServerMetrics
    from lcmserve.server.rest import create_app

    config = ServerConfig(warmup_steps=(), max_queue_delay_ms=0)
    metrics = ServerMetrics()
    sampler = FailingSampler(LCMSampler(load_model("preset:tiny-sd", device="cpu")))
    client = EngineClient(sampler, "preset:tiny-sd", config.batcher_config, on_batch=metrics.on_batch,
                          on_failure=metrics.on_failure)
    metrics.bind_client(client)
    client.start(())
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(client, config, metrics), host="127.0.0.1", port=port,
                                           lifespan="off", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        for path in ("/generate", "/v1/images/generations"):
            failed = httpx.post(url + path, json={"prompt": "boom", "steps": 1}, timeout=60)
            assert "illegal memory access" in _assert_error(failed, 500, "internal_error", None)["message"]
            ok = httpx.post(url + path, json={"prompt": "fine", "steps": 1}, timeout=60)
            assert ok.status_code == 200, ok.text[:300]
        text = httpx.get(url + "/metrics").text
        assert _metric(text, "lcmserve_failures_total", type="internal_error") == 2
        assert _metric(text, "lcmserve_request_duration_seconds_count", endpoint="/generate", status="500") == 1
        assert httpx.get(url + "/readyz").status_code == 200  # the worker survived
    finally:
        server.should_exit = True
        thread.join(10)
        client.close(0)


# 4. config -------------------------------------------------------------------------------------------
def test_config_layers_and_errors():
    config = ServerConfig.load({}, {})
    assert (config.host, config.port, config.grpc_port, config.api_key) == ("127.0.0.1", 8000, 50051, None)
    config = ServerConfig.load({"port": "9000"}, {"LCMSERVE_PORT": "8001", "LCMSERVE_MAX_IMAGES": "2",
                                                  "LCMSERVE_CORS_ORIGINS": "http://a.test,http://b.test",
                                                  "LCMSERVE_AUTH_METRICS": "true", "LCMSERVE_API_KEY": "s3cr3t"})
    assert (config.port, config.max_images, config.auth_metrics) == (9000, 2, True)
    assert config.cors_origins == ("http://a.test", "http://b.test")
    assert "s3cr3t" not in repr(config) and config.to_dict()["api_key"] == "<redacted>"
    with pytest.raises(InvalidInputError, match="LCMSERVE_PORT: port must be an integer") as info:
        ServerConfig.load({}, {"LCMSERVE_PORT": "http"})
    assert info.value.param == "port"
    with pytest.raises(InvalidInputError, match=r"--max-batch-size: max_batch_size must be an integer in \[1, 1024\]"):
        ServerConfig.load({"max_batch_size": "0"}, {})
    with pytest.raises(InvalidInputError, match="--warmup-steps"):
        ServerConfig.load({"warmup_steps": "1,9"}, {})
    with pytest.raises(InvalidInputError, match="max_queue_rows"):
        ServerConfig(max_batch_size=8, max_queue_rows=4)


def test_backend_auto_reports_what_it_picked_and_why(monkeypatch):
    from lcmserve.engine import backends
    from lcmserve.server.app import build_client
    from lcmserve.server.metrics import ServerMetrics

    picked = backends.BackendChoice("torch", "float32", "sdpa", "a machine of this test: the eager reference")
    asked = []
    monkeypatch.setattr(backends, "choose_before_load", lambda spec, **kw: asked.append((spec, kw)) or picked)
    config = ServerConfig(model="preset:tiny-sd", device="cpu", backend="auto", dtype="auto", grpc_port=0)
    info = build_client(config, ServerMetrics()).model_info()
    assert asked == [("preset:tiny-sd", {"unet": None, "device": "cpu", "dtype": "auto", "attention": "auto"})]
    assert (info["backend"], info["dtype"], info["attention"], info["backend_reason"]) == (
        "torch", "float32", "sdpa", picked.reason)


def test_serve_cli_flags_mirror_config(capsys):
    from dataclasses import fields

    from lcmserve.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for f in fields(ServerConfig):
        assert "--" + f.name.replace("_", "-") in text


# 5. schemathesis over the OpenAPI schema, in-process ------------------------------------------------------
def test_schemathesis_no_server_errors():
    import schemathesis
    import torch
    from hypothesis import HealthCheck, given, settings

    from lcmserve.server.app import build_client
    from lcmserve.server.metrics import ServerMetrics
    from lcmserve.server.rest import create_app

    seen: dict[tuple[str, str], set[int]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ServerConfig(max_images=2, max_pixels=96 * 96, warmup_steps=(), max_queue_delay_ms=0, backend="torch",
                          attention="sdpa")
    metrics = ServerMetrics()
    client = build_client(config, metrics)
    client.start(())
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(client, config, metrics))
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                response = case.call()
                seen.setdefault((case.method, case.path), set()).add(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

            check()
        assert 200 in seen[("POST", "/generate")] and 422 in seen[("POST", "/generate")], seen
        assert 200 in seen[("POST", "/v1/images/generations")], seen
    finally:
        client.close(5.0)
        torch.set_num_threads(threads)


def test_backend_flag_picks_the_engine_backend(monkeypatch):
    import lcmserve.engine.backends as backends
    from lcmserve.server.app import build_client
    from lcmserve.server.metrics import ServerMetrics

    with pytest.raises(InvalidInputError, match="--backend: backend must be one of (auto, )?torch, compiled, cuda-graph, onnx, tensorrt"):
        ServerConfig.load({"backend": "jax"}, {})
    config = ServerConfig.load({}, {"LCMSERVE_BACKEND": "cuda-graph", "LCMSERVE_MAX_BATCH_SIZE": "6"})
    config = dataclasses.replace(config, model="preset:tiny-sd", device="cpu", dtype="float32")
    with pytest.raises(InvalidInputError, match="needs the model on a CUDA GPU") as info:
        build_client(config, ServerMetrics())
    assert info.value.param == "backend"
    # What the server asks of a compiled backend: every batch size it can form, every step count, native size.
    seen = {}

    class Built(backends.TorchBackend):
        def warmup(self, progress=False):
            seen["warmed_before_the_worker"] = client.batcher.stats().state == "new"

    def fake_create(name, model, **kwargs):
        seen.update(name=name, **kwargs)
        return Built(model)

    monkeypatch.setattr(backends, "create_backend", fake_create)
    client = build_client(dataclasses.replace(config, backend="tensorrt", cache_dir="/tmp/x"), ServerMetrics())
    buckets = seen["buckets"]
    assert seen["name"] == "tensorrt" and seen["cache_dir"] == "/tmp/x"
    # the buckets build in the warm-up, which the server runs once its HTTP side answers /readyz with 503
    assert seen["warm"] is False and "warmed_before_the_worker" not in seen
    client.start(())
    assert seen["warmed_before_the_worker"] and client.ready
    client.close(5.0)
    assert buckets.batch_sizes == (1, 2, 4, 6) and buckets.steps == tuple(range(1, 9))
    assert buckets.resolutions == ((64, 64),)
    default = build_client(dataclasses.replace(config, backend="torch"), ServerMetrics())
    assert isinstance(default.sampler.backend, backends.TorchBackend)
