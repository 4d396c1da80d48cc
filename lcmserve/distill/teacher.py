"""The teacher pipeline of a distillation run: checks, loading, and its text conditioning.

Text features come from the engine's own encoder (``TorchBackend.encode_text``), so the
student is trained on exactly the conditioning it gets when served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcmserve.engine.backends.torch import TorchBackend
from lcmserve.engine.conditioning import TextConditioning
from lcmserve.errors import ModelLoadError
from lcmserve.models.loading import pipeline_index
from lcmserve.models.model import LCMModel, NoiseSchedule
from lcmserve.models.registry import resolve_bundled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherInfo:
    """What the checks read from the teacher folder without loading any weights."""

    folder: Path
    family: str  # "sd" or "sdxl"
    index: dict[str, Any]
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def is_lcm(self) -> bool:
        return self.unet_config.get("time_cond_proj_dim") is not None


def inspect_teacher(folder: str, mode: str) -> TeacherInfo:
    """Clear errors for a folder that is not a diffusers SD-family pipeline, or the wrong kind for ``mode``."""
    path = Path(resolve_bundled(folder)).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"teacher: folder {folder!r} does not exist (give a diffusers pipeline folder, or "
                             "shapes-teacher for the bundled one)", param="teacher")
    try:
        index = pipeline_index(path, f"folder {folder!r}")
    except ModelLoadError as exc:
        raise ModelLoadError(exc.message.replace("model:", "teacher:", 1), param="teacher") from exc
    configs = {}
    for name in ("unet", "scheduler"):
        files = [path / name / "config.json", path / name / "scheduler_config.json"]
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            raise ModelLoadError(f"teacher: {path / name} has no config file; is the folder complete?", param="teacher")
        configs[name] = json.loads(found.read_text())
    info = TeacherInfo(path, "sdxl" if "text_encoder_2" in index else "sd", index, configs["unet"], configs["scheduler"])
    if mode in ("lcd", "lora") and info.is_lcm:
        raise ModelLoadError(
            f"teacher: {folder!r} is already an LCM (its UNet has time_cond_proj_dim="
            f"{info.unet_config['time_cond_proj_dim']}); distil from the base diffusion model, or fine-tune this "
            "LCM with mode lcf", param="teacher",
        )
    if mode == "lcf" and not info.is_lcm:
        raise ModelLoadError(
            f"teacher: mode lcf fine-tunes an LCM, but {folder!r} has no guidance embedding (time_cond_proj_dim); "
            "distil it first with mode lcd", param="teacher",
        )
    return info


@dataclass
class Teacher:
    """The loaded pipeline (float32 on ``device``), frozen, with an engine model view for text and sampling."""

    info: TeacherInfo
    pipeline: Any
    model: LCMModel  # the engine's view of the same modules (text encoders, VAE, schedule)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def schedule(self) -> NoiseSchedule:
        return self.model.schedule


def load_teacher(info: TeacherInfo, device: torch.device) -> Teacher:
    from diffusers import DiffusionPipeline

    skipped = {name: None for name in ("safety_checker", "feature_extractor", "image_encoder") if name in info.index}
    if "safety_checker" in info.index:
        skipped["requires_safety_checker"] = False
    try:
        # float32 whatever the folder stores (the shapes teacher ships float16): the student trains from these.
        pipe = DiffusionPipeline.from_pretrained(str(info.folder), dtype=torch.float32, **skipped)
    except Exception as exc:  # diffusers raises many kinds for broken folders
        raise ModelLoadError(f"teacher: could not load {str(info.folder)!r}: {exc}", param="teacher") from exc
    encoders = (pipe.text_encoder, pipe.text_encoder_2) if info.family == "sdxl" else (pipe.text_encoder,)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2) if info.family == "sdxl" else (pipe.tokenizer,)
    for module in (pipe.unet, pipe.vae, *encoders):
        module.to(device).eval().requires_grad_(False)
    scheduler_config = dict(pipe.scheduler.config)
    model = LCMModel(
        name=str(info.folder), family=info.family, unet=pipe.unet, vae=pipe.vae, text_encoders=tuple(encoders),
        tokenizers=tuple(tokenizers), schedule=NoiseSchedule.from_scheduler_config(scheduler_config),
        guidance_mode="embedding" if info.is_lcm else "cfg", scheduler_config=scheduler_config,
        force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
    )
    return Teacher(info, pipe, model)


@torch.no_grad()
def encode_prompts(teacher: Teacher, prompts: list[str]) -> TextConditioning:
    """Text features of ``prompts`` exactly as the engine computes them at inference, in float32."""
    ids = tuple(
        tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
        for tok in teacher.model.tokenizers
    )
    return TorchBackend(teacher.model).encode_text(ids).to(teacher.model.device, torch.float32)


@torch.no_grad()
def unconditional(teacher: Teacher) -> TextConditioning:
    """Features of the empty prompt (zeros where SDXL asks for them), the teacher's unconditional input, in float32."""
    return TorchBackend(teacher.model).unconditional().to(teacher.model.device, torch.float32)
