"""A port in use: one line on stderr that names the flag to change, exit code 2, before the model loads."""

from __future__ import annotations

import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lcmserve.errors import InvalidInputError
from lcmserve.server.app import bind_port
from lcmserve.server.config import ServerConfig

# the command exits before the model loads: the imports are the time it takes
EXIT_WITHIN_S = 60


@pytest.fixture
def busy_port():
    """A port another program listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lcmserve.cli", "serve", "--host", "127.0.0.1", "--model", "preset:tiny-sd",
           "--device", "cpu", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=EXIT_WITHIN_S)


@pytest.mark.parametrize("busy, flags, expected", [
    ("port", ("--grpc-port", "0"), "HTTP port {port} on 127.0.0.1 is in use by another program: pass a free one "
                                   "with --port (or LCMSERVE_PORT)"),
    ("grpc_port", (), "gRPC port {port} on 127.0.0.1 is in use by another program: pass a free one with "
                      "--grpc-port (or LCMSERVE_GRPC_PORT), or --grpc-port 0 to turn gRPC off"),
])
def test_a_busy_port_is_one_line_naming_the_flag(busy_port, busy, flags, expected):
    other = free_port()
    ports = {"port": busy_port, "grpc_port": other} if busy == "port" else {"port": other, "grpc_port": busy_port}
    out = serve("--port", str(ports["port"]), "--grpc-port", str(ports["grpc_port"]), *flags)
    assert out.returncode == 2, out.stderr[-2000:]
    # nothing else: no traceback, no log of a model load the user would have waited for
    assert out.stderr.splitlines() == ["lcmserve: error: " + expected.format(port=busy_port)], out.stderr[-2000:]
    assert out.stdout == ""


def test_the_environment_variable_moves_the_port_too(busy_port):
    """LCMSERVE_PORT names the same port when no flag is given (make serve passes none when PORT is unset)."""
    config = ServerConfig.load({}, {"LCMSERVE_PORT": str(busy_port), "LCMSERVE_GRPC_PORT": "0"})
    with pytest.raises(InvalidInputError, match=f"HTTP port {busy_port} on 127.0.0.1 is in use"):
        bind_port(config.host, config.port)
    port = free_port()
    sockets = bind_port("127.0.0.1", port)  # a free one binds; uvicorn listens on it once the model is loaded
    assert [s.getsockname() for s in sockets] == [("127.0.0.1", port)]
    sockets[0].close()


def test_grpc_and_http_on_one_port_are_refused_at_start():
    with pytest.raises(InvalidInputError, match="grpc_port must be a port other than port=8000, or 0 to turn gRPC"):
        ServerConfig(port=8000, grpc_port=8000)


def test_grpcs_own_bind_failure_names_the_flag(busy_port):
    """The gRPC port checked before the model loads may be taken before grpc binds it: the same one line."""
    grpc_module = pytest.importorskip("lcmserve.server.grpc")
    client = SimpleNamespace(ready=False)
    with pytest.raises(InvalidInputError, match=f"gRPC port {busy_port} .*--grpc-port 0 to turn gRPC off"):
        grpc_module.build_grpc_server(client, ServerConfig(host="127.0.0.1", grpc_port=busy_port))
