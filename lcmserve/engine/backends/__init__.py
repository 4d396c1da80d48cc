"""Engine backends: one contract (``Backend.run``), one file per backend, one factory.

torch.py is the eager reference and the logic every backend shares, over a ``Networks`` triple
(text encoders, UNet, VAE). compiled.py, cuda_graph.py and tensorrt.py run it inside the bucketed
static-shape program of static.py; onnx.py calls ONNX Runtime sessions as its networks. auto.py is no
backend: its rule table picks one (and the dtype and attention) for this machine and model.
"""

from __future__ import annotations

from pathlib import Path

from lcmserve.engine.backends.auto import BackendChoice, auto_attention, choose_backend, choose_before_load
from lcmserve.engine.backends.base import (
    AUTO,
    BACKEND_CHOICES,
    BACKENDS,
    TORCH_EXECUTED,
    Backend,
    BackendOutput,
    Bucket,
    DenoiseBatch,
    StageTimes,
)
from lcmserve.engine.backends.buckets import BucketSet, pad_batch
from lcmserve.engine.backends.compiled import COMPILE_MODES, CompiledBackend, check_compile_mode
from lcmserve.engine.backends.cuda_graph import CudaGraphBackend, CudaGraphConfig
from lcmserve.engine.backends.torch import Networks, TorchBackend
from lcmserve.engine.kernels.attention import check_attention, use_small_head_attention
from lcmserve.errors import InvalidInputError


def check_backend_attention(name: str, attention: str) -> str:
    """Check a backend name and an attention mode that go together (before any model is loaded); returns the mode."""
    if name not in BACKEND_CHOICES:
        raise InvalidInputError.out_of_range("backend", name, "one of " + ", ".join(BACKEND_CHOICES))
    if check_attention(attention) == "small-head" and name not in (AUTO, *TORCH_EXECUTED):
        raise InvalidInputError(
            f"attention: small-head needs backend {', '.join(TORCH_EXECUTED)} (the torch-executed ones); "
            f"{name} runs its own graph: use --attention sdpa", param="attention")
    return attention


def create_backend(
    name: str,
    model,
    *,
    buckets: BucketSet | None = None,
    cache_dir: str | Path | None = None,
    compile: bool = False,
    compile_mode: str = "max-autotune-no-cudagraphs",
    channels_last: bool = False,
    exporter: str = "dynamo",
    build: bool = True,
    threads: int | None = None,
    progress: bool = False,
    attention: str = "sdpa",
    packages: bool = True,
    warm: bool = True,
) -> Backend:
    """The named backend over ``model``.

    ``buckets`` are the shapes compiled, cuda-graph and tensorrt build at start-up; ``cache_dir`` holds
    exported ONNX graphs and TensorRT engines (default ``$LCMSERVE_CACHE_DIR`` or
    ``~/.cache/lcmserve``); ``compile`` adds torch.compile to cuda-graph (``compile_mode``:
    max-autotune-no-cudagraphs or default) and ``channels_last`` NHWC convolutions; ``exporter`` and
    ``build`` apply to onnx (``build=False``: use cached graphs only), ``threads`` to its
    CPU provider (None: ONNX Runtime's default). ``attention="small-head"`` routes the UNet's attention
    through our CPU kernel (engine/kernels/attention.py) for the torch-executed backends on a CPU.
    ``packages`` (compiled, on a CPU): keep each bucket's networks as AOTInductor packages under ``cache_dir``,
    loaded at the next start instead of compiled (False: torch.compile at every start). ``warm=False``: compiled
    and cuda-graph build their buckets at ``backend.warmup()`` instead of here.

    ``name="auto"`` takes the backend (and with ``attention="auto"`` the attention) that backends/auto.py's
    rule picks for this machine and the model as loaded (its dtype counts as given: to let the rule pick
    the dtype too, call ``choose_before_load`` and load the model in its dtype). ``attention="auto"``
    beside a named backend: small-head where the kernel pays, else sdpa.
    """
    check_backend_attention(name, attention)
    if name == AUTO:
        choice = choose_backend(model, model.device, dtype=model.dtype_name, attention=attention)
        name, attention = choice.backend, choice.attention
    elif attention == AUTO:
        attention = auto_attention(name, model)
    if attention == "small-head":
        if model.device.type != "cpu":
            raise InvalidInputError(
                f"attention: small-head is a CPU kernel and the model is on {model.device.type} (where SDPA "
                "already runs flash attention): use --attention sdpa", param="attention")
        use_small_head_attention(model, cache_dir)
    if name == "torch":
        return TorchBackend(model)
    if name == "compiled":
        return CompiledBackend(model, buckets, progress, cache_dir=cache_dir, packages=packages, warm=warm)
    if name == "cuda-graph":
        return CudaGraphBackend(model, CudaGraphConfig(buckets=buckets or BucketSet(), compile=compile,
                                                        compile_mode=compile_mode, channels_last=channels_last,
                                                        warmup=warm),
                                progress)
    # onnx and tensorrt import their optional libraries only when chosen
    if name == "onnx":
        from lcmserve.engine.backends.onnx import OnnxBackend

        onnx_dir = None if cache_dir is None else Path(cache_dir) / "onnx"
        return OnnxBackend(model, onnx_dir, exporter=exporter, build=build, threads=threads)
    from lcmserve.engine.backends.tensorrt import TensorRTBackend, TensorRTConfig

    return TensorRTBackend(model, TensorRTConfig(buckets=buckets or BucketSet()), cache_dir, progress)


__all__ = [
    "AUTO", "BACKENDS", "BACKEND_CHOICES", "COMPILE_MODES", "TORCH_EXECUTED", "Backend", "BackendChoice",
    "BackendOutput", "Bucket", "BucketSet", "CompiledBackend", "CudaGraphBackend", "CudaGraphConfig", "DenoiseBatch",
    "Networks", "StageTimes", "TorchBackend", "check_backend_attention", "check_compile_mode", "choose_backend",
    "choose_before_load", "create_backend", "pad_batch",
]
