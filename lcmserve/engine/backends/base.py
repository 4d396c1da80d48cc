"""The one contract every engine backend fills (torch eager, compiled, CUDA graphs, ONNX, TensorRT)."""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import ModuleType

import torch

from lcmserve.engine.loop import StepCallback
from lcmserve.errors import InvalidInputError

BACKENDS = ("torch", "compiled", "cuda-graph", "onnx", "tensorrt")
TORCH_EXECUTED = ("torch", "compiled", "cuda-graph")  # the ones whose UNet runs torch's modules (and processors)
AUTO = "auto"  # not a backend: the rule of backends/auto.py picks one of BACKENDS for this machine and model
BACKEND_CHOICES = (AUTO, *BACKENDS)


@dataclass(frozen=True)
class Bucket:
    """What shapes a compiled graph: rows per batch, steps and resolution."""

    batch_size: int
    steps: int
    height: int
    width: int


@dataclass
class DenoiseBatch:
    """One batch, tokenized and with all its randomness drawn, ready for any backend.

    ``input_ids`` holds one [B, L] int64 tensor per text encoder; ``noise`` is
    [steps, B, C, h, w] float32 (initial latents, then one re-noise draw per later step);
    ``guidance_scale`` is [B] float32. ``negative_ids`` (one [B, L] tensor per text encoder) and
    ``negative_rows`` ([B] bool: the rows that have a negative prompt) are None when no row has one;
    rows without one take the empty prompt's features, as they would alone. All tensors live on the
    CPU; a backend moves them.
    """

    input_ids: tuple[torch.Tensor, ...]
    noise: torch.Tensor
    guidance_scale: torch.Tensor
    timesteps: tuple[int, ...]
    height: int
    width: int
    negative_ids: tuple[torch.Tensor, ...] | None = None
    negative_rows: torch.Tensor | None = None

    @property
    def bucket(self) -> Bucket:
        return Bucket(self.noise.shape[1], len(self.timesteps), self.height, self.width)


@dataclass
class StageTimes:
    """Wall time of each stage of one batch, in seconds."""

    text_s: float = 0.0
    unet_s: float = 0.0
    vae_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.text_s + self.unet_s + self.vae_s


class StageClock:
    """Stage boundaries: CUDA events on a GPU (no sync until read), wall time on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that wall time means what it says."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BackendOutput:
    """Decoded images as float32 [B, 3, H, W] in [0, 1] on the CPU, and where the time went."""

    images: torch.Tensor
    times: StageTimes = field(default_factory=StageTimes)


class Backend(ABC):
    """Runs text encoder -> LCM loop -> VAE decode for one DenoiseBatch."""

    name: str = "abstract"

    @abstractmethod
    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        """Generate the batch's images; ``on_step(i, x0_estimate)`` is called after each step if given."""

    def warmup(self, progress: bool = False) -> None:
        """Build now what the first batches would build (the bucketed backends' programs); nothing here."""


def import_optional(module: str, backend: str, needs: str, hint: str) -> ModuleType:
    """A backend's optional library, or a clear error naming the backend and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InvalidInputError(f"backend: the {backend} backend needs {needs}; {hint}", param="backend") from exc
