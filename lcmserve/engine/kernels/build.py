"""Building our C kernels: the system C compiler, for this CPU, into the artifact cache.

Each kernel is one C file compiled into a shared library on first use and cached like an ONNX
graph: under a hash of the source, the compiler, the flags and the CPU's feature flags, verified
on every load (a damaged file is rebuilt with a warning). The libraries run on PyTorch's own
OpenMP threads (they are loaded after torch, so their libgomp.so.1 is the runtime torch runs).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from lcmserve.engine.cache import ArtifactCache, default_cache_dir, file_sha256
from lcmserve.errors import InvalidInputError

# -march=native: vectors are AVX-512, AVX2, SSE or NEON registers as this CPU allows (the cache key
# carries the CPU's flags). No -ffast-math: NaN and infinity keep their meaning.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the dtypes our kernels take, as their C enum
I64_POINTER = ctypes.POINTER(ctypes.c_int64)


@dataclass(frozen=True)
class KernelSource:
    """One kernel: its C file, the library it builds, and what a failure should tell the user."""

    name: str  # cache entry name
    source: Path
    library: str
    param: str  # the setting that asked for it, named in errors
    purpose: str  # what it is, for the messages: "the small-head kernel"
    instead: str  # how to do without it: "use --attention sdpa"


def compiler(kernel: KernelSource) -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise InvalidInputError(
            f"{kernel.param}: {kernel.purpose} is built with a C compiler and none was found (set $CC or "
            f"install gcc); or {kernel.instead}", param=kernel.param)
    return cc


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), hashed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    return hashlib.sha256((line or platform.processor()).encode()).hexdigest()[:16]


def kernel_spec(cc: str, source: Path) -> dict[str, str | list[str]]:
    """Everything that shapes the built library: source, compiler, flags, CPU."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    return {"source_sha256": file_sha256(source), "compiler": cc, "compiler_version": version.splitlines()[0]
            if version else "unknown", "flags": list(FLAGS), "machine": platform.machine(), "cpu_flags": _cpu_flags()}


def build_library(kernel: KernelSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """The kernel's shared library, compiled now if the cache has no intact copy."""
    cc = compiler(kernel)

    def build(folder: Path) -> None:
        done = subprocess.run([cc, *FLAGS, "-o", str(folder / kernel.library), str(kernel.source)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InvalidInputError(
                f"{kernel.param}: compiling {kernel.purpose} with {cc} failed:\n{done.stderr.strip()}\n"
                f"fix the compiler or {kernel.instead}", param=kernel.param)

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return ArtifactCache(root / "kernels").get_or_build(kernel.name, kernel_spec(cc, kernel.source), build) / kernel.library


def load_library(kernel: KernelSource, cache_dir: str | os.PathLike | None, function: str, argtypes: list) -> ctypes.CDLL:
    """Build (if needed) and load the kernel's library, declaring its entry point (which returns an int status).

    torch is imported first, so the library's libgomp.so.1 resolves to the OpenMP runtime torch runs."""
    lib = ctypes.CDLL(str(build_library(kernel, cache_dir)))
    entry = getattr(lib, function)
    entry.argtypes = argtypes
    entry.restype = ctypes.c_int
    return lib
