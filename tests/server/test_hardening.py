"""Hostile and odd clients on loopback: bad text, bodies that do not parse, slow senders, huge gRPC messages.

One REST server (uvicorn in a thread, the serve command's protocol and middleware) and gRPC
servers over an EngineClient of the tiny random model; none of these requests reaches the
engine, so no image is made here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import grpc
import httpx
import pytest
import uvicorn

from lcmserve.engine.sampler import LCMSampler
from lcmserve.models import load_model
from lcmserve.server.app import uvicorn_config
from lcmserve.server.client import EngineClient
from lcmserve.server.config import ServerConfig
from lcmserve.server.grpc import SERVICE_NAME, build_grpc_server, pb2
from lcmserve.server.metrics import ServerMetrics
from lcmserve.server.rest import create_app

API_KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READ_TIMEOUT_S = 1.5
SURROGATE = "a\ud800b"  # what the JSON text "a\ud800b" decodes to: not encodable as UTF-8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None) -> dict:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    assert (body["error"]["type"], body["error"]["param"]) == (error_type, param), body
    return body["error"]


@pytest.fixture(scope="module")
def client():
    engine = EngineClient(LCMSampler(load_model("preset:tiny-sd", device="cpu")), "tiny")
    engine.start(warmup_steps=())
    yield engine
    engine.close(0)


@pytest.fixture(scope="module")
def rest(client):
    config = ServerConfig(host="127.0.0.1", port=free_port(), grpc_port=0, api_key=API_KEY, max_body_bytes=65536,
                          read_timeout_s=READ_TIMEOUT_S)
    server = uvicorn.Server(uvicorn_config(create_app(client, config, ServerMetrics()), config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{config.port}", port=config.port)
    server.should_exit = True
    thread.join(10)


def post_json(url: str, text: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """POST a JSON text as written (httpx's json= would refuse to encode a lone surrogate)."""
    return httpx.post(url, content=text.encode(), timeout=30,
                      headers={"Content-Type": "application/json", **(headers or {})})


# 1. text: a lone surrogate is a 422 naming its field on every route --------------------------------------
ROUTES = [("/generate", {}), ("/generate/stream", {}), ("/v1/images/generations", {}),
          ("/v1/images/generations", {"stream": True})]


@pytest.mark.parametrize(("path", "extra"), ROUTES, ids=["generate", "stream", "openai", "openai-stream"])
@pytest.mark.parametrize("param", ["prompt", "negative_prompt"])
def test_lone_surrogate_is_422_naming_the_field(rest, path, extra, param):
    body = {"prompt": "x", **extra}
    text = json.dumps(body)[:-1] + f', "{param}": "a\\ud800b"}}'
    error = assert_error(post_json(rest.url + path, text, AUTH), 422, "invalid_request", param)
    assert "U+D800" in error["message"]


def test_a_lone_surrogate_in_a_field_name_is_422_not_500(rest):
    response = post_json(rest.url + "/generate", '{"prompt": "x", "\\udc80": 1}', AUTH)
    assert_error(response, 422, "invalid_request", "body")


# 2. bodies that do not parse are 422 in the taxonomy's shape, the field named when there is one ----------
@pytest.mark.parametrize(("content", "param"), [
    (b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", "body"),
    (b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", "seed"),
    (b'{"prompt": "x", "guidance_scale": ' + b"7" * 5000 + b"}", "guidance_scale"),
    ('{"prompt": "caf\u00e9"}'.encode("latin-1"), "body"),
    (b"\xef\xbb\xbf" + b'{"prompt": "x"}', "body"),  # a byte order mark: not JSON
], ids=["nested", "long-int", "long-number-in-float", "latin-1", "bom"])
def test_unparsable_bodies_are_422(rest, content, param):
    for path in ("/generate", "/v1/images/generations"):
        response = httpx.post(rest.url + path, content=content, timeout=30,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert_error(response, 422, "invalid_request", param)


# 3. the key before the body: 401 whatever the body is ------------------------------------------------------
@pytest.mark.parametrize("content", [b"x" * 70000, b'{"prompt": ', b'{"prompt": 3}', b'{"prompt": "' + b"\xff" + b'"}'],
                         ids=["too-large", "broken", "invalid", "not-utf-8"])
def test_401_comes_before_the_body_is_read(rest, content):
    for path in ("/generate", "/generate/stream", "/v1/images/generations"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.post(rest.url + path, content=content, timeout=30,
                                  headers={**headers, "Content-Type": "application/json"})
            assert_error(response, 401, "unauthorized", "Authorization")
    assert_error(httpx.get(rest.url + "/v1/models"), 401, "unauthorized", "Authorization")
    assert httpx.get(rest.url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"


# 4. slow clients: cut off at the read deadline while other requests flow ----------------------------------
def _slow_send(port: int, head: bytes, trickle: bytes, tick_s: float = 0.35) -> tuple[bytes, float]:
    """Send ``head`` at once, then ``trickle`` a byte per ``tick_s`` until the server answers;
    (what it answered, seconds until it closed the connection). Once an answer comes, nothing more
    is sent: a byte sent to a closed socket makes the peer reset the connection, losing the answer."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        sock.settimeout(tick_s)
        received, sent = b"", 0
        while time.monotonic() - started < 20:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                if not received and sent < len(trickle):
                    sock.sendall(trickle[sent:sent + 1])
                    sent += 1
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return received, time.monotonic() - started
            received += chunk
        pytest.fail(f"the connection stayed open for {time.monotonic() - started:.1f} s; got {received[:200]!r}")


@pytest.mark.parametrize(("head", "trickle"), [
    (b"POST /generate HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + API_KEY.encode()
     + b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{", b"x" * 40),
    (b"", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"y" * 40),
    (b"", b""),  # connects and says nothing
], ids=["body", "headers", "silent"])
def test_a_slow_client_gets_408_and_is_disconnected(rest, head, trickle):
    """A client that started a request gets 408; one that sent nothing is closed without an answer."""
    others: list[float] = []
    stop = threading.Event()

    def normal_traffic() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert httpx.get(rest.url + "/healthz", timeout=5).status_code == 200
            others.append(time.monotonic() - started)
            time.sleep(0.1)

    thread = threading.Thread(target=normal_traffic)
    thread.start()
    try:
        received, elapsed_s = _slow_send(rest.port, head, trickle)
    finally:
        stop.set()
        thread.join(10)
    if head or trickle:
        assert received.startswith(b"HTTP/1.1 408 "), received[:200]
        assert b'"type":"request_timeout"' in received.replace(b" ", b"")
    else:
        assert received == b"", received[:200]
    assert READ_TIMEOUT_S - 0.1 <= elapsed_s <= READ_TIMEOUT_S + 1.5, elapsed_s
    assert len(others) >= 5 and max(others) < 1.0, others  # the rest of the server kept answering


# 5. gRPC: invalid UTF-8 is INVALID_ARGUMENT; the key and the size limit come before the message ----------
def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _string_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


@contextlib.contextmanager
def grpc_server(client, **config):
    port = free_port()
    server = build_grpc_server(client, ServerConfig(host="127.0.0.1", grpc_port=port, **config))
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def _raw_call(channel, method: str, data: bytes, streaming: bool = False, metadata=()):
    path = f"/{SERVICE_NAME}/{method}"
    if streaming:
        return list(channel.unary_stream(path)(data, timeout=10, metadata=metadata))
    return channel.unary_unary(path)(data, timeout=10, metadata=metadata)


def test_invalid_utf8_in_a_grpc_string_is_invalid_argument(client):
    bad = "a\ud800b".encode("utf-8", "surrogatepass")
    with grpc_server(client) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method, streaming in (("Generate", False), ("GenerateStream", True)):
            for number, param in ((1, "prompt"), (10, "negative_prompt")):
                data = _string_field(1, b"x") * (number != 1) + _string_field(number, bad)
                with pytest.raises(grpc.RpcError) as info:
                    _raw_call(channel, method, data, streaming)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
                assert dict(info.value.trailing_metadata())["lcmserve-error-param"] == param
                assert "UTF-8" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # GetModel's request has no string: a truncated one
            _raw_call(channel, "GetModel", _varint(1 << 3 | 2) + _varint(5) + b"ab")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        # valid bytes still work, through the same decoder
        reply = pb2.ModelInfo.FromString(_raw_call(channel, "GetModel", b""))
        assert reply.id == "tiny"


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


SEND_50MB = """
import sys, grpc
from concurrent.futures import ThreadPoolExecutor
port, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
size, head = 50_000_000, b"\\x0a"  # field 1 (prompt), length-delimited: 50 MB of text
while size > 0x7F:
    head, size = head + bytes([size & 0x7F | 0x80]), size >> 7
data = head + bytes([size]) + b"a" * 50_000_000
channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
call = channel.unary_unary("/lcmserve.v1.ImageGeneration/Generate")
metadata = (("authorization", "Bearer " + key),) if key != "-" else ()
def one(_):
    try:
        call(data, timeout=30, metadata=metadata)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
with ThreadPoolExecutor(n) as pool:
    print(" ".join(pool.map(one, range(n))))
"""


@pytest.mark.parametrize(("config", "key", "expected"), [
    ({"api_key": API_KEY, "grpc_max_message_bytes": 256 * 2**20}, "-", "UNAUTHENTICATED"),  # the gate alone
    ({"api_key": API_KEY}, API_KEY, "RESOURCE_EXHAUSTED"),  # the size limit alone
], ids=["no-key", "too-large"])
def test_50mb_grpc_messages_are_refused_without_growing_the_server(client, config, key, expected):
    with grpc_server(client, **config) as port:
        before = peak = _rss_bytes()
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_bytes())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            out = subprocess.run([sys.executable, "-c", SEND_50MB, str(port), key, "3"], capture_output=True,
                                 text=True, timeout=120, env={**os.environ, "GRPC_VERBOSITY": "NONE"})
        finally:
            done.set()
            sampler.join()
        assert out.stdout.split() == [expected] * 3, out.stdout + out.stderr[-2000:]
        after = _rss_bytes()
    assert peak - before < 50 * 2**20, (before, peak, after)
    assert after - before < 50 * 2**20, (before, peak, after)
