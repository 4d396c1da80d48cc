"""Per-request LoRA adapters over REST and gRPC: one engine client of the tiny model served by uvicorn and gRPC on
127.0.0.1 with an API key, an adapter given at start (``--adapter``) and more loaded and removed at run time."""

from __future__ import annotations

import base64
import socket
import threading
import time
from types import SimpleNamespace

import grpc
import httpx
import pytest
import uvicorn

from conftest import make_lora
from lcmserve.errors import InvalidInputError
from lcmserve.server.app import build_client, uvicorn_config
from lcmserve.server.config import ServerConfig
from lcmserve.server.grpc import build_grpc_server, pb2, pb2_grpc
from lcmserve.server.metrics import ServerMetrics
from lcmserve.server.rest import create_app

API_KEY = "adapter-key-1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {API_KEY}"),)
BODY = {"prompt": "a red circle", "steps": 2, "seed": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lora(lcm_sd_dir, tmp_path_factory):
    return make_lora(lcm_sd_dir, tmp_path_factory.mktemp("adapter-lora"), seed=21)


@pytest.fixture(scope="module")
def served(lcm_sd_dir, lora):
    config = ServerConfig.load({"adapters": [f"ink={lora}"]}, {
        "LCMSERVE_MODEL": str(lcm_sd_dir), "LCMSERVE_DEVICE": "cpu", "LCMSERVE_DTYPE": "float32",
        "LCMSERVE_BACKEND": "torch", "LCMSERVE_ATTENTION": "sdpa",
        "LCMSERVE_PORT": str(free_port()), "LCMSERVE_GRPC_PORT": str(free_port()), "LCMSERVE_API_KEY": API_KEY})
    metrics = ServerMetrics()
    client = build_client(config, metrics)
    client.start(warmup_steps=())
    server = uvicorn.Server(uvicorn_config(create_app(client, config, metrics), config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    grpc_server = build_grpc_server(client, config, metrics)
    grpc_server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}")
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    http = httpx.Client(base_url=f"http://127.0.0.1:{config.port}", headers=AUTH, timeout=60)
    yield SimpleNamespace(http=http, stub=pb2_grpc.ImageGenerationStub(channel), lora=str(lora))
    http.close()
    channel.close()
    grpc_server.stop(0)
    server.should_exit = True
    thread.join(10)
    client.close(0)


def generate(served, path: str = "/generate", **extra) -> httpx.Response:
    return served.http.post(path, json={**BODY, **extra})


def image_of(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text[:300]
    return base64.b64decode(response.json()["images"][0]["b64"])


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None) -> str:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert (error["type"], error["param"]) == (error_type, param), error
    return error["message"]


def names(served) -> list[str]:
    response = served.http.get("/v1/adapters")
    assert response.status_code == 200, response.text
    return [a["name"] for a in response.json()["data"]]


# 1. configuration: --adapter NAME=PATH ---------------------------------------------------------------------
def test_adapter_flags_and_variable_parse_and_refuse_malformed_entries():
    from lcmserve.cli import build_parser

    args = build_parser().parse_args(["serve", "--adapter", "ink=/a/ink", "--adapter", "outline=/b/outline"])
    assert ServerConfig.load(args, {}).adapters == ("ink=/a/ink", "outline=/b/outline")
    assert ServerConfig.load({}, {"LCMSERVE_ADAPTERS": "ink=/a,outline=/b"}).adapters == ("ink=/a", "outline=/b")
    for entry in ("ink", "=/a", "ink=", "bad name=/a"):
        with pytest.raises(InvalidInputError, match="--adapters: adapters must be NAME=PATH") as info:
            ServerConfig.load({"adapters": [entry]}, {})
        assert info.value.param == "adapters"
    with pytest.raises(InvalidInputError, match="LCMSERVE_ADAPTERS: .*'ink' is"):
        ServerConfig.load({}, {"LCMSERVE_ADAPTERS": "ink=/a,ink=/b"})


def test_the_adapter_given_at_start_is_listed_and_on_the_model_card(served):
    listed = served.http.get("/v1/adapters").json()["data"]
    ink = next(a for a in listed if a["name"] == "ink")
    assert ink["path"] == served.lora and ink["scale"] == 1.0 and ink["modules"] > 0 and ink["ranks"] == [4]
    assert "ink" in served.http.get("/v1/models").json()["data"][0]["adapters"]


# 2. REST: load, use, remove ----------------------------------------------------------------------------------
def test_load_generate_and_remove_over_rest(served):
    created = served.http.post("/v1/adapters", json={"name": "style", "path": served.lora, "scale": 1.0})
    assert created.status_code == 201 and created.json()["name"] == "style", created.text
    again = served.http.post("/v1/adapters", json={"name": "style", "path": served.lora})
    assert "already loaded" in assert_error(again, 409, "conflict", "name")
    assert {"ink", "style"} <= set(names(served))
    base, styled = image_of(generate(served)), image_of(generate(served, adapters={"style": 2.0}))
    assert styled != base and image_of(generate(served, adapters={"style": 2.0})) == styled
    openai = served.http.post("/v1/images/generations", json={"prompt": BODY["prompt"], "steps": 2, "seed": 3,
                                                              "adapters": {"style": 2.0}})
    assert openai.status_code == 200 and base64.b64decode(openai.json()["data"][0]["b64_json"]) == styled
    stream = served.http.post("/generate/stream", json={**BODY, "adapters": {"style": 2.0}, "previews": False})
    assert stream.status_code == 200 and "event: result" in stream.text
    assert 'lcmserve_adapter_rows_total{adapter="style"} 4.0' in served.http.get("/metrics").text
    removed = served.http.delete("/v1/adapters/style")
    assert removed.status_code == 204 and "style" not in names(served)
    message = assert_error(generate(served, adapters={"style": 1.0}), 404, "not_found", "adapters")
    assert "'style'" in message and "ink" in message
    assert "ink" in assert_error(served.http.delete("/v1/adapters/style"), 404, "not_found", "name")
    assert 'adapter="style"' not in served.http.get("/metrics").text


@pytest.mark.parametrize(("adapters", "param"), [
    ({f"a{i}": 1.0 for i in range(5)}, "adapters"), ({"ink": 5.0}, "adapters.ink"), ({"ink": "1"}, "adapters.ink")])
def test_too_many_adapters_or_a_scale_out_of_range_is_422(served, adapters, param):
    assert_error(generate(served, adapters=adapters), 422, "invalid_request", param)
    openai = served.http.post("/v1/images/generations", json={"prompt": "x", "adapters": adapters})
    assert_error(openai, 422, "invalid_request", param)


def test_an_unknown_adapter_is_404_listing_the_loaded_ones(served):
    for path in ("/generate", "/generate/stream", "/v1/images/generations"):
        message = assert_error(generate(served, path, adapters={"nope": 1.0}), 404, "not_found", "adapters")
        assert "'nope'" in message and "loaded: " in message and "ink" in message


def test_a_bad_file_is_422_naming_path_and_the_server_keeps_serving(served, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for path in (str(bad), str(tmp_path / "missing.safetensors")):
        response = served.http.post("/v1/adapters", json={"name": "broken", "path": path})
        assert path in assert_error(response, 422, "invalid_model", "path")
    assert_error(served.http.post("/v1/adapters", json={"name": "-x", "path": served.lora}), 422,
                 "invalid_request", "name")
    assert "broken" not in names(served)
    assert image_of(generate(served, adapters={"ink": 1.0}))


def test_the_adapter_routes_take_the_key(served):
    with httpx.Client(base_url=served.http.base_url, timeout=30) as bare:
        for response in (bare.get("/v1/adapters"), bare.delete("/v1/adapters/ink"),
                         bare.post("/v1/adapters", json={"name": "x", "path": served.lora})):
            assert_error(response, 401, "unauthorized", "Authorization")
    assert "ink" in names(served)
    with pytest.raises(grpc.RpcError) as info:
        served.stub.ListAdapters(pb2.ListAdaptersRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# 3. gRPC twins -------------------------------------------------------------------------------------------------
def grpc_image(served, **adapters) -> bytes:
    request = pb2.GenerateRequest(prompt=BODY["prompt"], steps=2, seed=3, adapters=adapters)
    return served.stub.Generate(request, timeout=60, metadata=GRPC_AUTH).images[0].data


def grpc_code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30, metadata=GRPC_AUTH)
    return info.value.code(), info.value.details()


def test_grpc_load_list_generate_remove(served):
    stub = served.stub
    info = stub.LoadAdapter(pb2.LoadAdapterRequest(name="g", path=served.lora), timeout=30, metadata=GRPC_AUTH)
    assert (info.name, info.scale, list(info.ranks)) == ("g", 1.0, [4])
    assert grpc_code(stub.LoadAdapter, pb2.LoadAdapterRequest(name="g", path=served.lora))[0] == (
        grpc.StatusCode.ALREADY_EXISTS)
    listed = stub.ListAdapters(pb2.ListAdaptersRequest(), timeout=10, metadata=GRPC_AUTH)
    assert {"ink", "g"} <= {a.name for a in listed.adapters}
    styled = grpc_image(served, g=2.0)
    assert styled != grpc_image(served) and styled == image_of(generate(served, adapters={"g": 2.0}))
    stub.RemoveAdapter(pb2.RemoveAdapterRequest(name="g"), timeout=30, metadata=GRPC_AUTH)
    code, details = grpc_code(stub.RemoveAdapter, pb2.RemoveAdapterRequest(name="g"))
    assert code == grpc.StatusCode.NOT_FOUND and "'g'" in details
    request = pb2.GenerateRequest(prompt="x", steps=2, adapters={"g": 1.0})
    code, details = grpc_code(stub.Generate, request)
    assert code == grpc.StatusCode.NOT_FOUND and "loaded: " in details and "ink" in details
    code, _ = grpc_code(stub.Generate, pb2.GenerateRequest(prompt="x", adapters={"ink": 5.0}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = grpc_code(stub.LoadAdapter, pb2.LoadAdapterRequest(name="b", path="/no/such/lora"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "/no/such/lora" in details
