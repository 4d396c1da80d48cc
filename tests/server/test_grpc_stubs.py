"""The committed gRPC stubs are what proto/lcmserve.proto compiles to.

After editing the proto, regenerate them with ``.venv/bin/python scripts/grpc_stubs.py``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "lcmserve" / "server" / "grpc_stubs"
FILES = ("lcmserve_pb2.py", "lcmserve_pb2_grpc.py")
REGENERATE = "regenerate them: .venv/bin/python scripts/grpc_stubs.py"


def _descriptor(text: str) -> bytes:
    """The serialized FileDescriptorProto a _pb2 module registers: the proto's content, whatever compiled it."""
    literal = re.search(r"AddSerializedFile\((b'.*?')\)\n", text, re.S).group(1)
    return ast.literal_eval(literal)


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "grpc_stubs.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh = {name: (tmp_path / name).read_text() for name in FILES}
    committed = {name: (COMMITTED / name).read_text() for name in FILES}
    assert _descriptor(fresh["lcmserve_pb2.py"]) == _descriptor(committed["lcmserve_pb2.py"]), (
        f"proto/lcmserve.proto and the committed stubs differ; {REGENERATE}")
    # Another grpcio-tools writes other version checks around the same descriptor: only the same one
    # must give the same text (which catches a hand edit).
    if f"grpcio-tools {metadata.version('grpcio-tools')}:" in committed["lcmserve_pb2.py"]:
        for name in FILES:
            assert fresh[name] == committed[name], f"{name} is not what the proto compiles to; {REGENERATE}"
    for name in FILES:
        assert committed[name].startswith("# generated from proto/lcmserve.proto; do not edit\n")


def test_the_stubs_import_without_compiling_anything():
    code = ("import sys; import lcmserve.server.grpc as g; "
            "assert 'grpc_tools.protoc' not in sys.modules, 'the compiler was loaded'; print(g.SERVICE_NAME)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "lcmserve.v1.ImageGeneration"
