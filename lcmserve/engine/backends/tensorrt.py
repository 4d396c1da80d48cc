"""TensorRT backend: FP16 engines built from the exported ONNX graphs, replayed as CUDA graphs.

1. ONNX graphs come from engine/export.py (one UNet/VAE graph per resolution, dynamic batch).
2. Each graph becomes one engine with one optimisation profile per batch bucket
   (min = opt = max, so every bucket gets kernels tuned for exactly its shape); a UNet that
   takes classifier-free guidance also gets profiles of twice the rows (its guided batches).
3. Engines are cached (engine/cache.py) under the ONNX entry's key (itself the weights'
   hash, dtype, resolution, versions), the TensorRT version, the GPU's name and compute
   capability and the profiles: a new driver stack, card or bucket never reuses an engine.
4. At run time each profile has its own execution context; the engines are the networks of
   the bucketed static program (static.py: static buffers, padding to buckets, three stages),
   whose stages cuda_graph.py captures with the ``execute_async_v3`` enqueues and the LCM step
   math inside, so a request replays the whole text -> loop -> VAE path without Python in between.

TensorRT is imported lazily: without it (or without a GPU) the backend says how to
install it or which backend to use instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lcmserve.engine.backends.base import Backend, BackendOutput, DenoiseBatch, import_optional
from lcmserve.engine.backends.buckets import BucketSet
from lcmserve.engine.backends.cuda_graph import capture_stages, check_graph_device
from lcmserve.engine.backends.static import BucketPrograms
from lcmserve.engine.backends.torch import Networks, TorchBackend
from lcmserve.engine.cache import MANIFEST, ArtifactCache, default_cache_dir
from lcmserve.engine.export import example_inputs, export_model, graph_names, text_graph, text_outputs, unet_feeds
from lcmserve.engine.loop import StepCallback
from lcmserve.errors import EngineError, InvalidInputError, check_float, check_int
from lcmserve.models.model import LCMModel

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install TensorRT 10 for your CUDA version (pip install 'lcmserve[tensorrt]', i.e. tensorrt and onnx) on a "
    "machine with an NVIDIA GPU, or use --backend cuda-graph (no TensorRT needed)"
)
MIN_VERSION = (8, 6)
ENGINE_FORMAT = 1


def import_tensorrt():
    tensorrt = import_optional("tensorrt", "tensorrt", "TensorRT", INSTALL_HINT)
    check_version(tensorrt.__version__)
    return tensorrt


def check_version(version: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        raise InvalidInputError(f"backend: cannot read the TensorRT version {version!r}", param="backend") from None
    if parts < MIN_VERSION:
        raise InvalidInputError(
            f"backend: TensorRT {version} is too old; the tensorrt backend needs >= "
            f"{'.'.join(map(str, MIN_VERSION))} (execute_async_v3, set_input_shape); {INSTALL_HINT}",
            param="backend",
        )
    return parts


@dataclass(frozen=True)
class TensorRTConfig:
    """How the tensorrt backend builds and runs its engines."""

    buckets: BucketSet = field(default_factory=BucketSet)
    """Shapes to build: one optimisation profile per batch size, one UNet/VAE engine per resolution."""
    cuda_graph: bool = True
    """Capture the enqueues of each request's stages as CUDA graphs."""
    workspace_gb: float = 8.0
    """Builder workspace limit in GiB."""
    optimization_level: int = 3
    """TensorRT builder optimisation level, 0 (fast build) to 5 (slowest build, fastest engine)."""

    def __post_init__(self) -> None:
        if not isinstance(self.buckets, BucketSet):
            raise InvalidInputError.out_of_range("buckets", self.buckets, "a BucketSet")
        check_float("workspace_gb", self.workspace_gb, 0, 1024, open_low=True)
        check_int("optimization_level", self.optimization_level, 0, 5)


# -- pure logic: which shapes each engine is built for ---------------------------------------------
def graph_batch_sizes(graph: str, buckets: BucketSet, guidance_mode: str) -> tuple[int, ...]:
    """Rows each engine sees: the buckets; a CFG UNet also twice them (guided batches run doubled, those with
    no row above w = 1 not); plus 1 for the text encoders (the empty prompt)."""
    sizes = set(buckets.batch_sizes)
    if graph.startswith("text_encoder"):
        sizes.add(1)
    elif graph == "unet" and guidance_mode == "cfg":
        sizes |= {2 * b for b in sizes}
    return tuple(sorted(sizes))


Shape = tuple[int, ...]


Profile = dict[str, tuple[Shape, Shape, Shape]]


def engine_profiles(input_shapes: dict[str, Shape], batch_sizes: tuple[int, ...]) -> list[Profile]:
    """One profile per batch size, min = opt = max = (batch, *per-row shape) for every input."""
    profiles = []
    for b in batch_sizes:
        profiles.append({name: ((b, *rest),) * 3 for name, rest in input_shapes.items()})
    return profiles


class ProfileTable:
    """Profile index of a batch size; a batch no profile was built for is a clear error."""

    def __init__(self, graph: str, batch_sizes: tuple[int, ...]) -> None:
        self.graph, self.batch_sizes = graph, tuple(batch_sizes)

    def index(self, batch_size: int) -> int:
        if batch_size not in self.batch_sizes:
            raise InvalidInputError.out_of_range(
                "batch_size", batch_size,
                f"one of the batch sizes the {self.graph} engine was built for {list(self.batch_sizes)}; "
                "rebuild the backend with a bucket that holds it",
            )
        return self.batch_sizes.index(batch_size)


def engine_spec(
    graph: str, onnx_key: str, trt_version: str, gpu: str, profiles: list, config: TensorRTConfig
) -> dict:
    """Everything that shapes one engine; its hash names the engine's cache entry."""
    return {
        "graph": graph, "format": ENGINE_FORMAT, "onnx": onnx_key, "tensorrt": trt_version, "gpu": gpu,
        "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
        "precision": "fp16", "workspace_gb": config.workspace_gb, "optimization_level": config.optimization_level,
    }


def gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


# -- TensorRT itself --------------------------------------------------------------------------
def build_engine(trt, onnx_path: Path, profiles: list, config: TensorRTConfig, out_path: Path) -> None:
    """Parse the ONNX file and write a serialized FP16 engine with the given profiles."""
    if not Path(onnx_path).is_file():
        raise InvalidInputError(f"cache_dir: ONNX file {onnx_path} does not exist; export it again", param="cache_dir")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"tensorrt: could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
    builder_config.set_flag(trt.BuilderFlag.FP16)
    builder_config.builder_optimization_level = config.optimization_level
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineError(f"tensorrt: building the engine of {onnx_path} failed (see TensorRT's log above)")
    with open(out_path, "wb") as handle:
        handle.write(serialized)


class TrtEngine:
    """A deserialized engine with one execution context per profile; runs on torch's current stream."""

    def __init__(self, trt, path: Path, table: ProfileTable, device: torch.device) -> None:
        self.trt, self.table, self.device = trt, table, device
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EngineError(f"tensorrt: could not deserialize {path}; delete it to rebuild")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        stream = torch.cuda.current_stream(device).cuda_stream
        self.contexts = []
        for index in range(len(table.batch_sizes)):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, stream)
            self.contexts.append(context)
        self._dtypes = {
            trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
        }
        if hasattr(trt.DataType, "BF16"):
            self._dtypes[trt.DataType.BF16] = torch.bfloat16

    def __call__(self, **tensors: torch.Tensor) -> list[torch.Tensor]:
        batch = next(iter(tensors.values())).shape[0]
        context = self.contexts[self.table.index(batch)]
        keep = []
        for name in self.inputs:
            t = tensors[name].to(self.device, self._dtypes[self.engine.get_tensor_dtype(name)]).contiguous()
            keep.append(t)
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)], device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError(f"tensorrt: execute_async_v3 failed for the {self.table.graph} engine")
        return outs


class TensorRTBackend(Backend):
    """The three networks as TensorRT engines inside the bucketed static program, captured as CUDA graphs."""

    name = "tensorrt"

    def __init__(
        self,
        model: LCMModel,
        config: TensorRTConfig | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        self.trt_config = config = config or TensorRTConfig()
        if model.device.type != "cuda":
            raise InvalidInputError(
                f"backend: tensorrt needs the model on a CUDA GPU (it is on {model.device.type}); use --device cuda, "
                "or --backend onnx / torch on a CPU",
                param="backend",
            )
        self.trt = import_tensorrt()
        self.model = model
        self.cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._engines: dict[tuple[str, int, int], TrtEngine] = {}
        self._build_engines(model, progress)
        check_graph_device(model, config.cuda_graph)
        self.eager = TorchBackend(model, Networks(self._text, self._unet, self._vae))
        self.programs = BucketPrograms(self.eager, config.buckets, name=self.name,
                                       capture=capture_stages if config.cuda_graph else None)
        self.programs.warmup(progress)

    def _build_engines(self, model: LCMModel, progress: bool) -> None:
        from tqdm import tqdm

        buckets, trt = self.trt_config.buckets, self.trt
        engines = ArtifactCache(self.cache_root / "tensorrt")
        onnx_cache = ArtifactCache(self.cache_root / "onnx")
        gpu = gpu_name(model.device)
        jobs = [(name, h, w) for h, w in buckets.resolutions for name in graph_names(model)]
        for name, h, w in tqdm(jobs, desc="TensorRT engines", unit="engine", disable=not progress):
            if name.startswith("text_encoder") and any(k[0] == name for k in self._engines):
                self._engines[(name, h, w)] = self._engine(name)  # the text encoders know no resolution
                continue
            onnx_path = export_model(model, onnx_cache.root, h, w, progress=False)[name]
            # The ONNX entry's full key already covers the weights, dtype, resolution and exporter versions.
            onnx_key = json.loads((onnx_path.parent / MANIFEST).read_text())["key"]
            sizes = graph_batch_sizes(name, buckets, model.guidance_mode)
            shapes = {k: tuple(v.shape[1:]) for k, v in example_inputs(model, name, h, w, batch=1).items()}
            profiles = engine_profiles(shapes, sizes)
            spec = engine_spec(name, onnx_key, trt.__version__, gpu, profiles, self.trt_config)
            folder = engines.get_or_build(
                f"trt-{name}", spec,
                lambda tmp, p=onnx_path, pr=profiles: build_engine(trt, p, pr, self.trt_config, tmp / "model.plan"),
            )
            self._engines[(name, h, w)] = TrtEngine(trt, folder / "model.plan", ProfileTable(name, sizes), model.device)

    def _engine(self, name: str, latents: torch.Tensor | None = None) -> TrtEngine:
        """The engine of graph ``name`` at the resolution of ``latents`` (text encoders: the one engine)."""
        if latents is None:
            return next(engine for key, engine in self._engines.items() if key[0] == name)
        f = self.model.vae_scale_factor
        return self._engines[(name, latents.shape[-2] * f, latents.shape[-1] * f)]

    # -- the three networks as engines ---------------------------------------------------------
    def _text(self, index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return text_outputs(self._engine(text_graph(index))(input_ids=input_ids))

    def _unet(self, sample, timestep, hidden, timestep_cond=None, added=None) -> torch.Tensor:
        return self._engine("unet", sample)(**unet_feeds(sample, timestep, hidden, timestep_cond, added))[0]

    def _vae(self, scaled_latents: torch.Tensor) -> torch.Tensor:
        return self._engine("vae_decoder", scaled_latents)(latents=scaled_latents)[0]

    @property
    def builds(self) -> int:
        return self.programs.builds

    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        return self.programs.run(batch, on_step)
