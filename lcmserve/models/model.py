"""The loaded LCM: its modules, its noise schedule and how it takes guidance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import LCMScheduler

from lcmserve.consistency import ORIGINAL_STEPS, PREDICTION_TYPES, TIMESTEP_SCALING

Family = Literal["sd", "sdxl"]
GuidanceMode = Literal["embedding", "cfg"]
# The guidance scale of a request that leaves it out. A distilled LCM takes w through its embedding and
# was trained over a range around the paper's w = 8. An LCM-LoRA already carries the guidance it was
# distilled with: its authors recommend 1-2 (not the 7-8 of a base model's guidance), and 1 runs no
# classifier-free guidance at all, one UNet pass per step, as diffusers' LCM-LoRA examples do.
DEFAULT_GUIDANCE: dict[str, float] = {"embedding": 8.0, "cfg": 1.0}


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete DDPM schedule the model was trained on, plus LCM's inference constants."""

    alphas_cumprod: torch.Tensor  # float32 [num_train_timesteps]
    prediction_type: str = "epsilon"
    timestep_scaling: float = TIMESTEP_SCALING
    original_steps: int = ORIGINAL_STEPS

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {self.prediction_type!r}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        """Read betas through diffusers' LCMScheduler, whatever scheduler the folder names."""
        lcm = LCMScheduler.from_config(config)
        return cls(
            alphas_cumprod=lcm.alphas_cumprod.clone().float(),
            prediction_type=lcm.config.prediction_type,
            timestep_scaling=float(lcm.config.timestep_scaling),
            original_steps=int(lcm.config.original_inference_steps),
        )


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent, each way: the KL VAE doubles per block, AutoencoderTiny by its configured factor."""
    factor = int(vae.config.get("upsampling_scaling_factor", 2))
    return factor ** (len(vae.config.block_out_channels) - 1)


@dataclass
class LCMModel:
    """Everything the engine needs from a diffusers-format LCM, already on its device and dtype."""

    name: str
    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, ...]
    tokenizers: tuple[Any, ...]
    schedule: NoiseSchedule
    guidance_mode: GuidanceMode
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    lora: str | None = None
    vae_source: str | None = None  # where a replacement VAE came from (--vae); None: the pipeline's own
    force_zeros_for_empty_prompt: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def dtype_name(self) -> str:
        """The dtype as the CLI and diffusers spell it: float32, bfloat16 or float16."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def native_size(self) -> int:
        """The square resolution in pixels the UNet was configured for."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def default_guidance_scale(self) -> float:
        """The w a request gets when it gives none (``DEFAULT_GUIDANCE`` of the guidance mode)."""
        return DEFAULT_GUIDANCE[self.guidance_mode]

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    def num_parameters(self) -> dict[str, int]:
        counts = {
            "unet": sum(p.numel() for p in self.unet.parameters()),
            "vae": sum(p.numel() for p in self.vae.parameters()),
        }
        for i, enc in enumerate(self.text_encoders):
            counts["text_encoder" + (f"_{i + 1}" if i else "")] = sum(p.numel() for p in enc.parameters())
        return counts

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for `lcmserve info`, logs and saved run configs."""
        return {
            "name": self.name,
            "family": self.family,
            "guidance_mode": self.guidance_mode,
            "default_guidance_scale": self.default_guidance_scale,
            "lora": self.lora,
            "vae": type(self.vae).__name__,
            "vae_source": self.vae_source,
            "device": str(self.device),
            "dtype": self.dtype_name,
            "native_size": self.native_size,
            "vae_scale_factor": self.vae_scale_factor,
            "latent_channels": self.latent_channels,
            "max_prompt_tokens": self.max_prompt_tokens,
            "prediction_type": self.schedule.prediction_type,
            "num_train_timesteps": self.schedule.num_train_timesteps,
            "time_cond_proj_dim": self.unet.config.time_cond_proj_dim,
            "parameters": self.num_parameters(),
        }
