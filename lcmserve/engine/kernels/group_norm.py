"""Group norm under torch.compile on a CPU: our statistics kernel for channels-last activations.

Why our own: with frozen weights, inductor lays convolution outputs out channels-last (NHWC) for
oneDNN, and its group norm then reduces each group's few channels as a masked vector per pixel,
far slower than ATen's eager kernel on large maps (the shapes VAE's 64x64); ATen's in turn is
slow on small channels-last maps, where inductor's is fine. ``group_norm.c`` sums along the
channels, all groups at once, in one pass per image, and returns only the mean and 1/std per
(image, group): the normalisation and the affine stay torch ops, so inductor fuses them with the
SiLU that follows into one element-wise loop.

Where: ``use_group_norm_kernel`` gives a module's ``nn.GroupNorm`` layers a subclass that takes
this path only while torch.compile traces it (not eagerly, not under torch.export or the ONNX
exporter, except inside ``for_inductor_export()``, for a graph that AOTInductor compiles), for 4-D
float32/bfloat16 CPU inputs of at least ``MIN_PIXELS`` pixels. Smaller maps stay with inductor:
on the shapes UNet's 16x16 and smaller maps the kernel gains nothing (with the op called through
Python it lost; as a C++ op it is a wash). The compiled backend installs it on
the UNet and the VAE on a CPU. The op's CPU kernel is registered from C++ (``group_norm_op.cpp``,
see ``build.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from pathlib import Path

import torch

from lcmserve.engine.kernels.build import KERNEL_DTYPES, KernelSource, is_loaded, load_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("group_norm.c")
OP_SOURCE = Path(__file__).with_name("group_norm_op.cpp")
LIBRARY = "group_norm.so"
MIN_PIXELS = 32 * 32

KERNEL = KernelSource("group-norm", SOURCE, OP_SOURCE, LIBRARY, param="backend",
                      purpose="the compiled backend's group-norm kernel", instead="use --backend torch")


def load_kernel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (if needed) and load the kernel, once per process; returns the loaded library."""
    return load_library(KERNEL, cache_dir)


# The schema (with inductor's flexible_layout tag: the op takes its input in whatever layout inductor
# chose, channels-last after a frozen convolution) and the fake kernel live here; the CPU kernel, from
# C++, comes with the library. Inputs the kernel does not read directly (another layout, another
# dtype) are copied to NHWC float32/bfloat16 first.
torch.library.define("lcmserve::group_norm_stats", "(Tensor x, int groups, float eps) -> (Tensor, Tensor)",
                     tags=(torch.Tag.flexible_layout,))


@torch.library.register_fake("lcmserve::group_norm_stats")
def _(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], groups, dtype=torch.float32), x.new_empty(x.shape[0], groups, dtype=torch.float32)


def group_norm_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/sqrt(var + eps) per (image, group) of a [N, C, H, W] CPU tensor, float32 [N, groups] each.

    Needs ``load_kernel()`` first."""
    if not is_loaded(KERNEL):
        raise RuntimeError("group_norm_stats: the kernel is not loaded; call load_kernel() first")
    return torch.ops.lcmserve.group_norm_stats(x, groups, eps)


# Set while torch.export traces a graph that AOTInductor compiles (backends/aoti.py): there the op is
# as welcome as under torch.compile, while other exporters (ONNX) must keep seeing torch's group norm.
_inductor_export = contextvars.ContextVar("lcmserve_group_norm_inductor_export", default=False)


@contextlib.contextmanager
def for_inductor_export():
    """Let ``KernelGroupNorm`` take the kernel under torch.export, for a graph that inductor compiles."""
    token = _inductor_export.set(True)
    try:
        yield
    finally:
        _inductor_export.reset(token)


class KernelGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` whose statistics come from ``group_norm_stats`` while torch.compile traces it."""

    def takes(self, x: torch.Tensor) -> bool:
        return (
            torch.compiler.is_compiling() and (not torch.compiler.is_exporting() or _inductor_export.get())
            and is_loaded(KERNEL)
            and x.ndim == 4 and x.device.type == "cpu" and x.dtype in KERNEL_DTYPES
            and x.shape[2] * x.shape[3] >= MIN_PIXELS
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes(x):
            return super().forward(x)
        n, c = x.shape[:2]
        per = c // self.num_groups
        mean, rstd = torch.ops.lcmserve.group_norm_stats(x, self.num_groups, self.eps)
        scale = rstd.repeat_interleave(per, dim=1).view(n, c, 1, 1)
        if self.weight is not None:
            scale = scale * self.weight.float().view(1, c, 1, 1)
        y = (x.float() - mean.repeat_interleave(per, dim=1).view(n, c, 1, 1)) * scale
        if self.bias is not None:
            y = y + self.bias.float().view(1, c, 1, 1)
        return y.to(x.dtype)


def use_group_norm_kernel(*modules: torch.nn.Module, cache_dir: str | os.PathLike | None = None) -> int:
    """Load the kernel and turn the ``nn.GroupNorm`` layers of ``modules`` into ``KernelGroupNorm``.

    The layers keep their parameters and, outside torch.compile, their behaviour (the subclass only
    adds the compiled path), so eager backends and exporters sharing the modules are unaffected.
    Returns how many layers were turned."""
    load_kernel(cache_dir)
    turned = 0
    for module in modules:
        for layer in module.modules():
            if type(layer) is torch.nn.GroupNorm:
                layer.__class__ = KernelGroupNorm
                turned += 1
    logger.debug("group-norm kernel: %d layers", turned)
    return turned
