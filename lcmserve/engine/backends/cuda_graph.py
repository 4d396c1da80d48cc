"""CUDA-graph backend: each bucket's whole request (text encoder, every UNet call, VAE decode)
captured once and replayed, fp16 by default (bf16 or fp32 as the model was loaded).

The program replayed is the bucketed static-shape program of ``static.py`` (static buffers,
three stages, padding to the bucket); this file captures its stages. A request copies its rows
into the input buffers, replays three graphs (text, the unrolled LCM loop, VAE) and copies the
images back; the only host-device synchronisation is that final copy. Because the sampler draws
every row's noise on the CPU from the row's own seed, replaying a graph gives each row the same
image as eager. The three graphs share one memory pool per bucket; CUDA events between them give
the per-stage split.

Trade-offs (the flags): graphs take memory per bucket and minutes to warm up at start-up;
``compile=True`` captures ``torch.compile``d networks (compiled.py: longer warm-up, faster
kernels); ``channels_last=True`` moves the convolutions to NHWC. ``capture=False`` runs the same
static-buffer program without graphs: the way to tell a capture problem from a model problem,
and the only mode on a CPU (used by the CPU tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from lcmserve.engine.backends.base import Backend, BackendOutput, DenoiseBatch
from lcmserve.engine.backends.buckets import BucketSet
from lcmserve.engine.backends.compiled import COMPILE_MODE, check_compile_mode, compile_context, compiled_networks
from lcmserve.engine.backends.static import BucketPrograms, Stages, check_cpu_dtype
from lcmserve.engine.backends.torch import Networks, TorchBackend
from lcmserve.engine.loop import StepCallback
from lcmserve.errors import EngineError, InvalidInputError, check_int
from lcmserve.models.model import LCMModel

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class CudaGraphConfig:
    """How the cuda-graph backend builds its buckets."""

    buckets: BucketSet = dataclasses.field(default_factory=BucketSet)
    """Shapes captured at start-up; a batch runs in the smallest bucket that holds it."""
    capture: bool = True
    """Capture CUDA graphs; False runs the same static-buffer program eagerly (debugging, CPU)."""
    capture_text: bool = True
    """Capture the text encoder too; False runs it eagerly into the static buffers."""
    compile: bool = False
    """torch.compile the UNet and VAE decoder before capture (``compile_mode``; on a CPU, where nothing is
    captured, the compiled backend's settings: compiled.py), compiling each bucket at warm-up."""
    compile_mode: str = COMPILE_MODE
    """GPU compile only: max-autotune-no-cudagraphs (the fastest kernels, minutes of autotuning per
    bucket at warm-up) or default (library kernels with fused elementwise work; a far shorter warm-up)."""
    channels_last: bool = False
    """Put the UNet's and VAE's convolution weights in channels-last (NHWC) memory, the layout of
    cuDNN's tensor-core kernels, so activations follow. This changes the model the backend is given
    (numerically the same network)."""
    freeze: bool = True
    """CPU compile only: inductor freezing (weights folded in as constants, prepacked for oneDNN, the
    activation fused into the convolution); False compiles without it."""
    warmup: bool = True
    """Build every bucket at construction instead of on its first request."""
    warmup_iters: int = 2
    """Eager runs before each capture (lazy initialisation, cuDNN/cuBLAS autotuning, compilation)."""

    def __post_init__(self) -> None:
        if not isinstance(self.buckets, BucketSet):
            raise InvalidInputError.out_of_range("buckets", self.buckets, "a BucketSet")
        check_int("warmup_iters", self.warmup_iters, 1)
        check_compile_mode(self.compile_mode)


def capture_stages(stages: Stages, warmup_iters: int = 2, capture_text: bool = True) -> dict[str, torch.cuda.CUDAGraph]:
    """Each stage of a bucket's program as a CUDA graph, all in one memory pool (``capture_text=False``: not text)."""
    # 1. warm up on a side stream (the recipe of torch.cuda.graphs' documentation)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            for fn in stages.values():
                fn()
    torch.cuda.current_stream().wait_stream(side)
    # 2. capture each stage into one shared pool. The stages pass data only through the program's
    # static buffers, allocated outside the pool, so a replay may skip a stage (a CFG model's batch
    # runs one of its two loops) or take them in another order.
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for name, fn in stages.items():
        if name == "text" and not capture_text:
            continue
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                fn()
        except Exception as exc:
            hint = " (capture_text=False runs the text encoder eagerly)" if name == "text" else ""
            raise EngineError(
                f"cuda-graph: capturing the {name} stage failed: {exc}{hint}; --backend torch avoids graphs"
            ) from exc
        graphs[name] = graph
    return graphs


def check_graph_device(model: LCMModel, capture: bool) -> None:
    """Capture needs the model on a CUDA GPU in a GPU dtype; uncaptured on a CPU, float32 or bfloat16."""
    if not capture:
        check_cpu_dtype(model)
        return
    if model.device.type != "cuda":
        raise InvalidInputError(
            f"backend: cuda-graph captures CUDA graphs and needs the model on a CUDA GPU (it is on "
            f"{model.device.type}); use --backend torch or onnx here, or --device cuda", param="backend")
    if model.dtype not in GPU_DTYPES:
        raise InvalidInputError.out_of_range("dtype", model.dtype_name, "float16 (default), bfloat16 or float32")


class CudaGraphBackend(Backend):
    """Whole-request CUDA graphs per bucket over the eager backend's own stage code.

    ``networks``: what the stages call (default: the model's modules, compiled when ``config.compile``)."""

    name = "cuda-graph"

    def __init__(self, model: LCMModel, config: CudaGraphConfig | None = None, progress: bool = False,
                 networks: Networks | None = None) -> None:
        self.model, self.config = model, config or CudaGraphConfig()
        config = self.config
        check_graph_device(model, config.capture)
        if config.channels_last:
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        if networks is None and config.compile:
            networks = compiled_networks(model, config.buckets, config.compile_mode)
        self.eager = TorchBackend(model, networks)
        self.captures = 0  # CUDA graphs captured so far; requests after warm-up must not add any
        self.programs = BucketPrograms(
            self.eager, config.buckets, name=self.name, capture=self._capture if config.capture else None,
            build_context=(lambda: compile_context(model, config.freeze)) if config.compile else contextlib.nullcontext,
            warm_runs=config.warmup_iters if config.compile else 0)
        if config.warmup:
            self.programs.warmup(progress)

    def warmup(self, progress: bool = False) -> None:
        self.programs.warmup(progress)

    def _capture(self, stages: Stages) -> dict[str, torch.cuda.CUDAGraph]:
        graphs = capture_stages(stages, self.config.warmup_iters, self.config.capture_text)
        self.captures += len(graphs)
        return graphs

    @property
    def networks(self) -> Networks:
        return self.eager.networks

    @property
    def builds(self) -> int:
        """Buckets built so far; requests after warm-up must not add any."""
        return self.programs.builds

    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        return self.programs.run(batch, on_step)
