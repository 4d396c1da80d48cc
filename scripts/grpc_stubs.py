"""Regenerate the committed gRPC stubs from proto/lcmserve.proto.

    .venv/bin/python scripts/grpc_stubs.py            # rewrites lcmserve/server/grpc_stubs/
    .venv/bin/python scripts/grpc_stubs.py --out DIR  # writes them to DIR instead

grpcio-tools compiles the proto under its own name (``lcmserve.proto``, the file name that
reflection reports); two edits follow: a header that names the source, and the service
module's import of its messages made absolute, so that the stubs live inside the package.
tests/server/test_grpc_stubs.py regenerates them and fails when the committed ones differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "proto" / "lcmserve.proto"
STUBS = REPO / "lcmserve" / "server" / "grpc_stubs"
PACKAGE = "lcmserve.server.grpc_stubs"
FILES = ("lcmserve_pb2.py", "lcmserve_pb2_grpc.py")


def header() -> str:
    return (f"# generated from proto/lcmserve.proto; do not edit\n"
            f"# (grpcio-tools {metadata.version('grpcio-tools')}: python scripts/grpc_stubs.py)\n")


def generate(out: Path) -> list[Path]:
    """Compile the proto into ``out``; returns the files written."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        shutil.copy(PROTO, Path(work) / "lcmserve.proto")
        include = resources.files("grpc_tools") / "_proto"
        rc = protoc.main(["grpc_tools.protoc", f"-I{work}", f"-I{include}", f"--python_out={work}",
                          f"--grpc_python_out={work}", str(Path(work) / "lcmserve.proto")])
        if rc != 0:
            raise SystemExit(f"grpc_tools.protoc failed (exit {rc}) on {PROTO}; see its message above")
        written = []
        for name in FILES:
            text = (Path(work) / name).read_text()
            text = text.replace("import lcmserve_pb2 as", f"from {PACKAGE} import lcmserve_pb2 as")
            (out / name).write_text(header() + text)
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STUBS, help=f"where to write (default {STUBS.relative_to(REPO)})")
    for path in generate(parser.parse_args(argv).out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
