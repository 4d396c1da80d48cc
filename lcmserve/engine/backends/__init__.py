"""Engine backends: one contract (``Backend.run``), one file per backend, one factory."""

from __future__ import annotations

from pathlib import Path

from lcmserve.engine.backends.base import Backend, BackendOutput, Bucket, DenoiseBatch, StageTimes
from lcmserve.engine.backends.buckets import BucketSet, pad_batch
from lcmserve.engine.backends.cuda_graph import CompiledBackend, CudaGraphBackend, CudaGraphConfig
from lcmserve.engine.backends.torch_backend import TorchBackend
from lcmserve.engine.kernels.attention import check_attention, use_small_head_attention
from lcmserve.errors import InvalidInputError

BACKENDS = ("torch", "compiled", "cuda-graph", "onnx", "tensorrt")
TORCH_EXECUTED = ("torch", "compiled", "cuda-graph")  # the ones whose UNet runs torch's modules (and processors)


def check_backend_attention(name: str, attention: str) -> str:
    """Check a backend name and an attention mode that go together (before any model is loaded); returns the mode."""
    if name not in BACKENDS:
        raise InvalidInputError.out_of_range("backend", name, "one of " + ", ".join(BACKENDS))
    if check_attention(attention) == "small-head" and name not in TORCH_EXECUTED:
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
) -> Backend:
    """The named backend over ``model``.

    ``buckets`` are the shapes compiled, cuda-graph and tensorrt build at start-up; ``cache_dir`` holds
    exported ONNX graphs and TensorRT engines (default ``$LCMSERVE_CACHE_DIR`` or
    ``~/.cache/lcmserve``); ``compile`` adds torch.compile to cuda-graph (``compile_mode``: max-autotune-no-cudagraphs or default) and
    ``channels_last`` NHWC convolutions; ``exporter`` and
    ``build`` apply to onnx (``build=False``: use cached graphs only), ``threads`` to its
    CPU provider (None: ONNX Runtime's default). ``attention="small-head"`` routes the UNet's attention
    through our CPU kernel (engine/kernels/attention.py) for the torch-executed backends on a CPU.
    """
    if check_backend_attention(name, attention) == "small-head":
        if model.device.type != "cpu":
            raise InvalidInputError(
                f"attention: small-head is a CPU kernel and the model is on {model.device.type} (where SDPA "
                "already runs flash attention): use --attention sdpa", param="attention")
        use_small_head_attention(model, cache_dir)
    if name == "torch":
        return TorchBackend(model)
    if name == "compiled":
        return CompiledBackend(model, buckets, progress, cache_dir=cache_dir)
    if name == "cuda-graph":
        return CudaGraphBackend(model, CudaGraphConfig(buckets=buckets or BucketSet(), compile=compile,
                                                        compile_mode=compile_mode, channels_last=channels_last),
                                progress)
    if name == "onnx":
        from lcmserve.engine.backends.onnx_backend import OnnxBackend

        onnx_dir = None if cache_dir is None else Path(cache_dir) / "onnx"
        return OnnxBackend(model, onnx_dir, exporter=exporter, build=build, threads=threads)
    from lcmserve.engine.backends.tensorrt_backend import TensorRTBackend, TensorRTConfig

    return TensorRTBackend(model, TensorRTConfig(buckets=buckets or BucketSet()), cache_dir, progress)


__all__ = [
    "BACKENDS", "TORCH_EXECUTED", "Backend", "BackendOutput", "Bucket", "BucketSet", "CompiledBackend", "CudaGraphBackend", "CudaGraphConfig",
    "DenoiseBatch", "StageTimes", "TorchBackend", "check_backend_attention", "create_backend", "pad_batch",
]
