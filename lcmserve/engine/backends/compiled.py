"""Compiled backend: torch.compile over the bucketed static-shape program, without graph capture.

The CPU's fast path. Inductor fuses the element-wise work between the convolutions and matrix
products (group norm + SiLU, residual adds, the LCM step math) into generated C++ loops and,
with frozen weights, prepacks them for oneDNN. Its kernels are specialised to shapes, so they
are compiled per bucket at start-up and a batch pads to the next bucket, as with CUDA graphs. On a
CPU each network's program per bucket shape is an AOTInductor package kept in lcmserve's cache
(aoti.py), so that a restart loads it instead of compiling; elsewhere, and for a network that does
not export, torch.compile compiles at every start (inductor's on-disk cache keeps only part of that
work: cache.use_inductor_cache). On a CPU the
text encoder is compiled too, inductor calls its kernels from C++ (``inductor_cpu_settings``),
and group norms over large maps take our statistics kernel (engine/kernels/group_norm.py). On a
GPU, ``cuda-graph`` with ``compile=True`` puts graphs on top of the same compiled networks and
is the better choice. Measurements: the bench results in docs/results/.
"""

from __future__ import annotations

import contextlib
import os

import torch

from lcmserve.engine.backends.aoti import PackageStats, packaged_networks
from lcmserve.engine.backends.base import Backend, BackendOutput, DenoiseBatch
from lcmserve.engine.backends.buckets import BucketSet
from lcmserve.engine.backends.static import BucketPrograms, check_cpu_dtype
from lcmserve.engine.backends.torch import Networks, TorchBackend, module_networks
from lcmserve.engine.cache import use_inductor_cache
from lcmserve.engine.kernels.group_norm import use_group_norm_kernel
from lcmserve.engine.loop import StepCallback
from lcmserve.errors import InvalidInputError
from lcmserve.models.model import LCMModel

# torch.compile modes on a GPU, inside our own CUDA graphs: "reduce-overhead" and "max-autotune" capture
# graphs of their own and are left out. max-autotune-no-cudagraphs benchmarks Triton templates against
# cuBLAS/cuDNN for every matrix product and convolution at compile time (minutes per bucket of a large
# model); default keeps the libraries' kernels and fuses the elementwise work around them.
COMPILE_MODES = ("max-autotune-no-cudagraphs", "default")
COMPILE_MODE = COMPILE_MODES[0]
WARM_RUNS = 2  # runs of every stage at start-up, so that compiling and lazy initialisation precede any request


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InvalidInputError.out_of_range(
            "compile_mode", mode, "one of " + ", ".join(COMPILE_MODES) + " (reduce-overhead and max-autotune capture "
            "CUDA graphs of their own, which this backend already does)")
    return mode


def inductor_cpu_settings(freeze: bool = True) -> dict[str, bool]:
    """Inductor's global settings while the compiled backend compiles on a CPU (``torch._inductor.config.patch``)."""
    # cpp_wrapper: inductor writes the code that calls its kernels and oneDNN's as C++ rather than
    # Python; a UNet makes a few hundred such calls per step, and each costs less from C++, with the
    # same output (measured: docs/results/). Building the wrapper apart from the kernels compiles it at -O1
    # instead of -O3 with them: a shorter compile at the same speed.
    settings = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
    if freeze:
        # Freezing folds the weights in as constants, which lets inductor prepack them for oneDNN
        # and fuse the activation into the convolution (mkldnn::_convolution_pointwise); safe because
        # a served model's weights never change.
        settings["freezing"] = True
    # These have to be in inductor's global config while a graph compiles:
    # torch.compile(options={"freezing": True}) does not reach the freezing pass.
    return settings


def cpu_compile_options() -> dict:
    """``torch.compile`` keywords for the compiled backend's functions on a CPU: guards on tensor arguments only."""
    # Before every call dynamo checks its guards, and those on the modules' attributes (and on global
    # state, the functions and globals the model's code reads) are a visible share of a small model's
    # batch-1 request (measured: docs/results/). Nothing they watch changes in a served model after warm-up: the
    # weights are frozen into the code, the backend calls its functions only under inference mode
    # with its own static tensors, so the guards that stay are those on the tensor arguments, which
    # tell the bucket shapes apart. isolate_recompiles keeps these guard-light entries to this
    # backend's own calls (another model compiled in the same process cannot hit them).
    return {"options": {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}, "isolate_recompiles": True}


def compile_options(device_type: str, mode: str = COMPILE_MODE) -> dict:
    """``torch.compile`` keywords of the bucketed backends: ``mode`` on a GPU; on a CPU our own set."""
    check_compile_mode(mode)
    return cpu_compile_options() if device_type == "cpu" else {"mode": mode}


def compiled_networks(model: LCMModel, buckets: BucketSet, mode: str = COMPILE_MODE,
                      cache_dir: str | os.PathLike | None = None) -> Networks:
    """The model's networks through ``torch.compile`` (compiled lazily, on each shape's first call; inductor's
    caches under ``cache_dir``, see ``use_inductor_cache``)."""
    how = prepare_compile(model, buckets, mode, cache_dir)
    vae = model.vae
    unet = torch.compile(model.unet, dynamic=False, **how)
    decode = torch.compile(lambda z: vae.decode(z, return_dict=False)[0], dynamic=False, **how)
    # On a CPU the text encoder is a noticeable share of a small batch; on a GPU it runs inside the
    # captured graph, where compiling it would buy little.
    encoders = None
    if model.device.type == "cpu":
        encoders = tuple(torch.compile(encoder, dynamic=False, **how) for encoder in model.text_encoders)
    return module_networks(model, encoders, unet, decode)


def prepare_compile(model: LCMModel, buckets: BucketSet, mode: str = COMPILE_MODE,
                    cache_dir: str | os.PathLike | None = None) -> dict:
    """Inductor's caches and dynamo's recompile limit set for the buckets; returns the ``torch.compile`` keywords."""
    use_inductor_cache(cache_dir)
    # Dynamo keeps one compiled variant per input shape of a function, up to recompile_limit (8 by
    # default); past that it silently runs eagerly. Every bucket shape needs its own variant.
    shapes = len(buckets.batch_sizes) * len(buckets.resolutions)
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, shapes + 1)
    return compile_options(model.device.type, mode)


def cpu_packaged_networks(model: LCMModel, buckets: BucketSet, freeze: bool = True,
                          cache_dir: str | os.PathLike | None = None, stats: PackageStats | None = None) -> Networks:
    """On a CPU, the networks as AOTInductor packages (aoti.py) built with the same inductor settings as
    torch.compile's; a network that does not export falls back to torch.compile with the backend's options."""
    how = prepare_compile(model, buckets, cache_dir=cache_dir)
    return packaged_networks(model, lambda module: torch.compile(module, dynamic=False, **how),
                             inductor_cpu_settings(freeze), cache_dir, stats)


class CompiledBackend(Backend):
    """torch.compile over the bucketed static-shape program (``static.BucketPrograms``), nothing captured.

    ``packages`` (on a CPU): keep each network's per-shape program as an AOTInductor package in the cache
    (``CACHE/aoti``), loaded at the next start instead of compiled; False: torch.compile at every start.
    ``package_stats`` counts what warm-up loaded, built or compiled instead. ``warm=False`` leaves the warm-up to
    ``warmup()`` (the server runs it after its HTTP side is up, so /readyz answers 503 meanwhile)."""

    name = "compiled"

    def __init__(self, model: LCMModel, buckets: BucketSet | None = None, progress: bool = False,
                 freeze: bool = True, group_norm_kernel: bool = True,
                 cache_dir: str | os.PathLike | None = None, packages: bool = True, warm: bool = True) -> None:
        check_cpu_dtype(model)
        buckets = buckets or BucketSet()
        if group_norm_kernel and model.device.type == "cpu":
            # inductor's group norm is slow on the channels-last maps it gives oneDNN (engine/kernels/group_norm.py)
            use_group_norm_kernel(model.unet, model.vae, cache_dir=cache_dir)
        self.model = model
        self.package_stats = PackageStats()
        if packages and model.device.type == "cpu":
            networks = cpu_packaged_networks(model, buckets, freeze, cache_dir, self.package_stats)
        else:
            networks = compiled_networks(model, buckets, cache_dir=cache_dir)
        eager = TorchBackend(model, networks)
        self.programs = BucketPrograms(eager, buckets, name=self.name, warm_runs=WARM_RUNS,
                                       build_context=lambda: compile_context(model, freeze))
        if warm:
            self.programs.warmup(progress)

    def warmup(self, progress: bool = False) -> None:
        self.programs.warmup(progress)

    @property
    def builds(self) -> int:
        return self.programs.builds

    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        return self.programs.run(batch, on_step)


def compile_context(model: LCMModel, freeze: bool = True):
    """Inductor settings in force while the buckets compile on a CPU (compilation happens on first call)."""
    if model.device.type != "cpu":
        return contextlib.nullcontext()
    return torch._inductor.config.patch(**inductor_cpu_settings(freeze))
