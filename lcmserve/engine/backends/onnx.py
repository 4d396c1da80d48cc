"""ONNX Runtime backend: the exported graphs (engine/export.py) as the eager backend's networks.

Only the three networks change: tokens, noise, guidance, the LCM loop and the step math are
the eager backend's own code, so the two can differ only by what ONNX Runtime computes
differently inside a graph (float32 on CPU: ~1e-5). Graphs are exported on first use of a
resolution and cached on disk; ``build=False`` refuses to export and names the missing file.

Providers: CPUExecutionProvider (float32) on CPU; CUDAExecutionProvider (float16 or float32)
when the model lives on a GPU and onnxruntime-gpu is installed. Tensors cross the
ONNX Runtime boundary through host memory: simple and exact, not the fast GPU path (that is
the cuda-graph or tensorrt backend).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lcmserve.engine.backends.base import Backend, BackendOutput, DenoiseBatch, import_optional
from lcmserve.engine.backends.torch import Networks, TorchBackend
from lcmserve.engine.cache import default_cache_dir
from lcmserve.engine.export import DEFAULT_OPSET, check_exporter, export_model, text_graph, text_outputs, unet_feeds
from lcmserve.engine.loop import StepCallback
from lcmserve.errors import InvalidInputError
from lcmserve.models.model import LCMModel

logger = logging.getLogger(__name__)

_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}
INSTALL_HINT = "pip install 'lcmserve[onnx]' (onnx, onnxruntime; onnxruntime-gpu for the CUDA provider)"


def import_onnxruntime():
    return import_optional("onnxruntime", "onnx", "onnxruntime", INSTALL_HINT)


class OrtGraph:
    """One ONNX Runtime session; takes and returns torch tensors."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None) -> None:
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(
                f"cache_dir: ONNX file {path} does not exist; export it again with `lcmserve export`", param="cache_dir"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Between the sessions' runs torch does the scheduler arithmetic and the noise: threads that
        # spin-wait after a run would take the cores it needs (the default spins).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    def __call__(self, device: torch.device, **tensors: torch.Tensor) -> list[torch.Tensor]:
        missing = set(self.inputs) - set(tensors)
        if missing:
            raise RuntimeError(f"{self.path}: inputs {sorted(missing)} were not given")
        feeds = {name: tensors[name].detach().float().cpu().numpy().astype(np_type, copy=False)
                 if np_type in (np.float32, np.float16)
                 else tensors[name].detach().cpu().numpy().astype(np_type, copy=False)
                 for name, np_type in self.inputs.items()}
        return [torch.from_numpy(out).to(device) for out in self.session.run(None, feeds)]


class OnnxBackend(Backend):
    """Text encoder(s), UNet and VAE decoder through ONNX Runtime; everything else as eager."""

    name = "onnx"

    def __init__(
        self,
        model: LCMModel,
        cache_dir: str | Path | None = None,
        *,
        exporter: str = "dynamo",
        opset: int = DEFAULT_OPSET,
        build: bool = True,
        threads: int | None = None,
    ) -> None:
        ort = import_onnxruntime()
        check_exporter(exporter)
        self.model = model
        self.providers = self._providers(model, ort.get_available_providers())
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "onnx"
        self.exporter, self.opset, self.build, self.threads = exporter, opset, build, threads
        self._graphs: dict[Path, OrtGraph] = {}
        self._prepared: dict[tuple[int, int], dict[str, OrtGraph]] = {}
        self._current: dict[str, OrtGraph] = {}
        self.eager = TorchBackend(model, Networks(self._text, self._unet, self._vae))

    @staticmethod
    def _providers(model: LCMModel, available: list[str]) -> list[str]:
        if model.device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise InvalidInputError(
                    "device: the onnx backend on a GPU needs onnxruntime-gpu (CUDAExecutionProvider); installed "
                    f"providers: {', '.join(available)}; use --device cpu or install onnxruntime-gpu",
                    param="device",
                )
            if model.dtype == torch.bfloat16:
                raise InvalidInputError.out_of_range("dtype", "bfloat16", "float16 or float32 for the onnx backend")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if model.dtype != torch.float32:
            raise InvalidInputError.out_of_range(
                "dtype", model.dtype_name, "float32 for the onnx backend on CPU"
            )
        return ["CPUExecutionProvider"]

    def prepare(self, height: int, width: int, progress: bool = False) -> dict[str, OrtGraph]:
        """Sessions for one resolution (exported and cached on first use unless build=False)."""
        paths = export_model(
            self.model, self.cache_dir, height, width, exporter=self.exporter, opset=self.opset,
            build=self.build, progress=progress,
        )
        graphs = {}
        for name, path in paths.items():
            if path not in self._graphs:
                self._graphs[path] = OrtGraph(path, self.providers, self.threads)
            graphs[name] = self._graphs[path]
        return graphs

    # -- the three networks, as sessions of the current resolution ------------------------------
    def _text(self, index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return text_outputs(self._current[text_graph(index)](self.model.device, input_ids=input_ids.to(torch.int32)))

    def _unet(self, sample, timestep, hidden, timestep_cond=None, added=None) -> torch.Tensor:
        return self._current["unet"](self.model.device, **unet_feeds(sample, timestep, hidden, timestep_cond, added))[0]

    def _vae(self, scaled_latents: torch.Tensor) -> torch.Tensor:
        return self._current["vae_decoder"](self.model.device, latents=scaled_latents)[0]

    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        # The cache is verified (files hashed) once per resolution, not on every request.
        key = (batch.height, batch.width)
        if key not in self._prepared:
            self._prepared[key] = self.prepare(batch.height, batch.width)
        self._current = self._prepared[key]
        return self.eager.run(batch, on_step)
