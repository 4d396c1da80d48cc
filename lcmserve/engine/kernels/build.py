"""Building our kernels: a C file for the arithmetic and a C++ file that makes it a PyTorch operator.

Each kernel is one C file (the loops, for this CPU) and a short C++ file that registers it as the CPU
implementation of an ``lcmserve::`` operator through PyTorch's stable C++ ABI; its schema and fake
(shape) kernel are defined in Python. They are compiled into one shared library on first use and
cached like an ONNX graph: under a hash of both sources, the compilers, the flags, the CPU's feature
flags and torch's version, verified on every load (a damaged file is rebuilt with a warning).

Why an operator in C++: under torch.compile's C++ wrapper (the compiled backend on a CPU), an operator
implemented in Python is called back through the interpreter; one in C++ is called directly, at a
fraction of the per-call cost. The stable ABI talks to libtorch through C functions only, so
the library does not depend on libtorch's C++ ABI. The kernels run on PyTorch's own OpenMP threads
(the library is loaded after torch, so its libgomp.so.1 is the runtime torch runs).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.torch_version import TorchVersion

from lcmserve.engine.cache import ArtifactCache, default_cache_dir, file_sha256
from lcmserve.errors import InvalidInputError

# -march=native: vectors are AVX-512, AVX2, SSE or NEON registers as this CPU allows (the cache key
# carries the CPU's flags). No -ffast-math: NaN and infinity keep their meaning.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")
# The operator's C++ only unpacks tensors and calls the kernel.
OP_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fopenmp")
MIN_TORCH = "2.10"  # the stable C++ API's ops (new_empty with a dtype, contiguous, to) the operators use
TORCH_DIR = Path(torch.__file__).parent
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what our kernels compute in (float32 math)
_loaded: dict[str, Path] = {}  # kernel name -> the library this process loaded


@dataclass(frozen=True)
class KernelSource:
    """One kernel: its C and C++ files, the library they build, and what a failure should tell the user."""

    name: str  # cache entry name
    source: Path  # the kernel, C
    op_source: Path  # its operator registration, C++
    library: str
    param: str  # the setting that asked for it, named in errors
    purpose: str  # what it is, for the messages: "the small-head kernel"
    instead: str  # how to do without it: "use --attention sdpa"


def find_compilers() -> tuple[str | None, str | None]:
    """The C and the C++ compiler: ``$CC`` and ``$CXX``, else the system's; None for one not found."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return cc, cxx


def compilers(kernel: KernelSource) -> tuple[str, str]:
    """The C and the C++ compiler, or an error that says what is missing and how to do without the kernel."""
    cc, cxx = find_compilers()
    if not cc or not cxx:
        missing = "a C compiler ($CC, or gcc)" if not cc else "a C++ compiler ($CXX, or g++)"
        raise InvalidInputError(
            f"{kernel.param}: {kernel.purpose} is built with a C and a C++ compiler and {missing} was not found "
            f"(install gcc and g++, or set $CC and $CXX); or {kernel.instead}", param=kernel.param)
    return cc, cxx


def check_torch(kernel: KernelSource) -> None:
    if TorchVersion(torch.__version__) < MIN_TORCH:
        raise InvalidInputError(
            f"{kernel.param}: {kernel.purpose} is a PyTorch operator built on torch's stable C++ API, which needs "
            f"torch >= {MIN_TORCH}; this is torch {torch.__version__}: upgrade torch, or {kernel.instead}",
            param=kernel.param)


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), hashed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    return hashlib.sha256((line or platform.processor()).encode()).hexdigest()[:16]


def compiler_version(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


def kernel_spec(kernel: KernelSource, cc: str, cxx: str) -> dict[str, str | list[str]]:
    """Everything that shapes the built library: sources, compilers, flags, CPU, torch."""
    return {"source_sha256": file_sha256(kernel.source), "op_source_sha256": file_sha256(kernel.op_source),
            "compiler": cc, "compiler_version": compiler_version(cc),
            "cxx": cxx, "cxx_version": compiler_version(cxx),
            "flags": list(FLAGS), "op_flags": list(OP_FLAGS), "machine": platform.machine(),
            "cpu_flags": cpu_flags(), "torch": torch.__version__}


def build_library(kernel: KernelSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """The kernel's shared library, compiled now if the cache has no intact copy."""
    check_torch(kernel)
    cc, cxx = compilers(kernel)

    def run(compiler: str, args: list[str]) -> None:
        done = subprocess.run([compiler, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InvalidInputError(
                f"{kernel.param}: compiling {kernel.purpose} with {compiler} failed:\n{done.stderr.strip()}\n"
                f"fix the compiler or {kernel.instead}", param=kernel.param)

    def build(folder: Path) -> None:
        objects = folder / "objects"  # not part of the entry
        objects.mkdir()
        kernel_object = objects / f"{kernel.source.stem}.o"
        run(cc, [*FLAGS, "-c", "-o", str(kernel_object), str(kernel.source)])
        run(cxx, [*OP_FLAGS, "-I", str(TORCH_DIR / "include"), "-o", str(folder / kernel.library),
                  str(kernel.op_source), str(kernel_object), "-L", str(TORCH_DIR / "lib"), "-ltorch_cpu", "-lc10"])
        shutil.rmtree(objects)

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return ArtifactCache(root / "kernels").get_or_build(kernel.name, kernel_spec(kernel, cc, cxx), build) / kernel.library


def load_library(kernel: KernelSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (if needed) and load the kernel's library, which registers its operator's CPU kernel.

    Once per process: an operator has one CPU kernel, so later calls return the library loaded first.
    torch is imported first, so the library's libgomp.so.1 resolves to the OpenMP runtime torch runs."""
    if kernel.name not in _loaded:
        path = build_library(kernel, cache_dir)
        torch.ops.load_library(str(path))
        _loaded[kernel.name] = path
    return _loaded[kernel.name]


def is_loaded(kernel: KernelSource) -> bool:
    return kernel.name in _loaded
