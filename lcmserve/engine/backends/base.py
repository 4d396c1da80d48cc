"""The one contract every engine backend fills (torch eager, CUDA graphs, ONNX, TensorRT)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import ModuleType

import torch

from lcmserve.engine.loop import StepCallback


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


def import_optional(module: str, backend: str, needs: str, hint: str) -> ModuleType:
    """A backend's optional library, or a clear error naming the backend and how to install it."""
    from lcmserve.errors import InvalidInputError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InvalidInputError(f"backend: the {backend} backend needs {needs}; {hint}", param="backend") from exc
