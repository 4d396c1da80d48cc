"""Load an LCM from a diffusers-format folder, a Hub id, or a preset.

Supported: full LCMs of the SD1.5 / SD2.x family (a UNet with ``time_cond_proj_dim``, like
LCM_Dreamshaper_v7), SDXL-family LCMs (two text encoders, added time ids), a base model plus
an LCM-LoRA adapter (fused at load with diffusers' own LoRA loader), and a base pipeline
with a separately distributed LCM UNet (``unet=``, as latent-consistency/lcm-sdxl ships).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from lcmserve.errors import InvalidInputError, ModelLoadError
from lcmserve.models.model import LCMModel, NoiseSchedule, vae_scale_factor
from lcmserve.models.presets import PRESET_PREFIX, build_preset_pipeline, build_preset_vae, get_preset
from lcmserve.models.registry import resolve_bundled

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")  # what --vae may load: the full KL VAE or TAESD
_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_COMPONENTS = _SD_COMPONENTS + ("text_encoder_2", "tokenizer_2")
# Components we never run; passing None keeps diffusers from loading their weights.
_SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise InvalidInputError.out_of_range("device", device, "auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device: {device!r} asked for, but torch sees no CUDA GPU; use --device cpu",
                                param="device")
    return torch.device(device)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Turn user strings into a device and dtype; fp16 on GPU and fp32 on CPU by default."""
    dev = resolve_device(device)
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidInputError.out_of_range("dtype", dtype, "one of auto, " + ", ".join(DTYPES))
    if dev.type == "cpu" and dtype == "float16":
        raise InvalidInputError(
            "dtype: float16 is not supported on CPU (slow and inexact there); use float32 or bfloat16", param="dtype"
        )
    if dev.type == "cpu" and dtype == "bfloat16" and not cpu_has_bfloat16():
        logger.warning("dtype: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); bfloat16 runs emulated "
                       "here, several times slower than float32 (use --dtype float32)")
    return dev, DTYPES[dtype]


def cpu_has_bfloat16() -> bool:
    """Whether an x86 CPU computes in bfloat16 natively (AVX512-BF16 or AMX); other CPUs are taken at their word."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") != 1 or os.sep != "/" and os.sep in spec


def pipeline_index(folder: Path, where: str) -> dict[str, Any]:
    """The model_index.json of a diffusers pipeline folder, checked to be an SD-family text-to-image pipeline;
    ``where`` names the folder in errors."""
    index = _read_index(folder)
    _check_components(index, where)
    return index


def _read_index(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"model: folder {str(folder)!r} is not a diffusers pipeline (no model_index.json); expected the layout "
            "that DiffusionPipeline.save_pretrained writes: model_index.json with unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/",
            param="model",
        )
    try:
        return json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model: {index_file} is not valid JSON ({exc})", param="model") from exc


def _check_components(index: dict[str, Any], where: str) -> None:
    required = _SDXL_COMPONENTS if "text_encoder_2" in index else _SD_COMPONENTS
    missing = [name for name in required if not index.get(name) or index[name][0] is None]
    if missing:
        raise ModelLoadError(
            f"model: {where} lacks {', '.join(missing)}; lcmserve runs text-to-image pipelines of the "
            f"Stable Diffusion family ({', '.join(required)})",
            param="model",
        )
    unet_class = index["unet"][1]
    if unet_class != "UNet2DConditionModel":
        raise ModelLoadError(
            f"model: {where} has a {unet_class}; lcmserve supports UNet2DConditionModel pipelines (SD1.5, SD2.x, SDXL)",
            param="model",
        )


def _from_pretrained(spec: str, index: dict[str, Any], dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    skipped = {name: None for name in _SKIPPED_COMPONENTS if name in index}
    if "safety_checker" in index:
        skipped["requires_safety_checker"] = False
    return DiffusionPipeline.from_pretrained(spec, dtype=dtype, **skipped)


def _load_pipeline(spec: str, dtype: torch.dtype):
    if spec.startswith(PRESET_PREFIX):
        get_preset(spec)  # clear error for an unknown name before any work
        return build_preset_pipeline(spec, dtype=dtype)
    spec = resolve_bundled(spec)
    folder = Path(spec).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelLoadError(f"model: {spec!r} is a file; give the pipeline's folder", param="model")
        index = pipeline_index(folder, f"folder {spec!r}")
        try:
            return _from_pretrained(str(folder), index, dtype)
        except Exception as exc:  # diffusers raises many kinds for broken folders
            raise ModelLoadError(f"model: could not load folder {spec!r}: {exc}", param="model") from exc
    if _looks_like_path(spec):
        raise ModelLoadError(f"model: folder {spec!r} does not exist", param="model")
    # A Hub id: diffusers resolves it (and its cache) when the user has the network.
    try:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(spec)
        _check_components(index, f"Hub model {spec!r}")
        return _from_pretrained(spec, index, dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"model: {spec!r} is not a local folder and could not be loaded from the Hugging Face Hub ({exc})",
            param="model",
        ) from exc


def _swap_unet(pipe, unet_spec: str, dtype: torch.dtype) -> None:
    from diffusers import UNet2DConditionModel

    folder = Path(unet_spec).expanduser()
    subfolder = "unet" if (folder / "unet" / "config.json").is_file() else None
    if folder.exists() and not (folder / (subfolder or "") / "config.json").is_file():
        raise ModelLoadError(f"unet: folder {unet_spec!r} holds no UNet (config.json not found)", param="unet")
    if not folder.exists() and _looks_like_path(unet_spec):
        raise ModelLoadError(f"unet: folder {unet_spec!r} does not exist", param="unet")
    try:
        pipe.unet = UNet2DConditionModel.from_pretrained(unet_spec, subfolder=subfolder, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"unet: could not load {unet_spec!r}: {exc}", param="unet") from exc


def _read_vae_config(vae_spec: str, param: str) -> tuple[str | None, dict[str, Any]]:
    """(subfolder, config) of a VAE folder, a pipeline folder's vae/, or a Hub id."""
    folder = Path(vae_spec).expanduser()
    if folder.is_dir():
        for subfolder in (None, "vae"):
            config_file = folder / (subfolder or "") / "config.json"
            if config_file.is_file():
                try:
                    return subfolder, json.loads(config_file.read_text())
                except json.JSONDecodeError as exc:
                    raise ModelLoadError(f"{param}: {config_file} is not valid JSON ({exc})", param=param) from exc
        raise ModelLoadError(
            f"{param}: folder {vae_spec!r} holds no VAE (config.json, or vae/config.json)", param=param)
    if folder.exists():
        raise ModelLoadError(f"{param}: {vae_spec!r} is a file; give the VAE's folder", param=param)
    if _looks_like_path(vae_spec):
        raise ModelLoadError(f"{param}: folder {vae_spec!r} does not exist", param=param)
    from diffusers import AutoencoderKL

    try:  # a Hub id (e.g. madebyollin/taesd): diffusers resolves it when the user has the network
        return None, dict(AutoencoderKL.load_config(vae_spec))
    except Exception as exc:
        raise ModelLoadError(
            f"{param}: {vae_spec!r} is not a local folder or preset and could not be loaded from the Hugging Face "
            f"Hub ({exc})", param=param) from exc


def load_vae(vae_spec: str, *, latent_channels: int, scale_factor: int, dtype: torch.dtype,
             param: str = "vae") -> torch.nn.Module:
    """A VAE (folder, pipeline folder, Hub id or ``preset:taesd``) that fits the model's latents, on the CPU.

    ``param`` names the setting in errors (``vae``, or the server's ``preview_vae``)."""
    import diffusers

    if not isinstance(vae_spec, str) or not vae_spec.strip():
        raise ModelLoadError(f"{param}: give a VAE folder, a Hub id or preset:taesd", param=param)
    if vae_spec.startswith(PRESET_PREFIX):
        vae = build_preset_vae(vae_spec, dtype=dtype, param=param)
    else:
        subfolder, config = _read_vae_config(vae_spec, param)
        class_name = config.get("_class_name")
        if class_name not in VAE_CLASSES:
            raise ModelLoadError(
                f"{param}: {vae_spec!r} holds a {class_name}; allowed: {', '.join(VAE_CLASSES)}", param=param)
        try:
            vae = getattr(diffusers, class_name).from_pretrained(vae_spec, subfolder=subfolder, dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"{param}: could not load {vae_spec!r}: {exc}", param=param) from exc
    if int(vae.config.latent_channels) != latent_channels:
        raise ModelLoadError(
            f"{param}: {vae_spec!r} decodes {vae.config.latent_channels}-channel latents; the model's UNet makes "
            f"{latent_channels}", param=param)
    if vae_scale_factor(vae) != scale_factor:
        raise ModelLoadError(
            f"{param}: {vae_spec!r} upsamples latents {vae_scale_factor(vae)}x; the model's VAE does "
            f"{scale_factor}x, and the two must agree", param=param)
    return vae.eval().requires_grad_(False)


def load_preview_decoder(model: LCMModel, vae_spec: str) -> torch.nn.Module:
    """A second decoder for step previews only (e.g. TAESD), on the model's device, fitted to its latents."""
    vae = load_vae(vae_spec, latent_channels=model.latent_channels, scale_factor=model.vae_scale_factor,
                   dtype=model.dtype, param="preview_vae")
    return _upcast_if_needed(vae.to(model.device), model.family)


def _upcast_if_needed(vae, family: str):
    """The SDXL KL VAE overflows in fp16; diffusers' SDXL pipelines upcast it too. SD 1.x/2.x VAEs decode fine
    in fp16 (diffusers' SD pipelines never upcast them), although their configs say force_upcast; TAESD never
    needs it (its config says so). Only a VAE that needs it is cast."""
    if family == "sdxl" and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae.to(torch.float32)
    return vae


def _swap_vae(pipe, vae_spec: str, dtype: torch.dtype) -> None:
    """Replace the pipeline's VAE: a TAESD (AutoencoderTiny) decodes in a fraction of the time."""
    pipe.vae = load_vae(vae_spec, latent_channels=int(pipe.unet.config.in_channels),
                        scale_factor=vae_scale_factor(pipe.vae), dtype=dtype)


def _fuse_lora(pipe, lora: str, lora_scale: float) -> None:
    lora = resolve_bundled(lora, kind="lora", param="lora")
    path = Path(lora).expanduser()
    if not path.exists() and _looks_like_path(lora):
        raise ModelLoadError(f"lora: {lora!r} does not exist", param="lora")
    try:
        pipe.load_lora_weights(lora, adapter_name="lcm")
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()  # the fused weights stay; the peft wrappers go
    except Exception as exc:
        raise ModelLoadError(f"lora: could not load LoRA {lora!r}: {exc}", param="lora") from exc


def _is_lcm(pipe) -> bool:
    return pipe.unet.config.time_cond_proj_dim is not None or type(pipe.scheduler).__name__ == "LCMScheduler"


def load_model(
    spec: str,
    *,
    lora: str | None = None,
    lora_scale: float = 1.0,
    unet: str | None = None,
    vae: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> LCMModel:
    """Load ``spec`` (folder, Hub id, ``preset:NAME`` or a bundled model's name) as an LCM.

    ``unet`` replaces the pipeline's UNet; ``vae`` its VAE (a folder or Hub id of an AutoencoderKL or
    AutoencoderTiny, or ``preset:taesd``): a TAESD trades some detail for a far faster decode."""
    dev, torch_dtype = resolve_device_dtype(device, dtype)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("model: give a diffusers folder, a Hub id or preset:NAME", param="model")
    pipe = _load_pipeline(spec, torch_dtype)
    if unet is not None:
        _swap_unet(pipe, unet, torch_dtype)
    if vae is not None:
        _swap_vae(pipe, vae, torch_dtype)
    if lora is not None:
        _fuse_lora(pipe, lora, lora_scale)
    if lora is None and not _is_lcm(pipe):
        raise ModelLoadError(
            f"model: {spec!r} is not an LCM: its UNet has no guidance embedding (time_cond_proj_dim) and its "
            f"scheduler is {type(pipe.scheduler).__name__}, not LCMScheduler; pass an LCM-LoRA (--lora), an LCM "
            "UNet (--unet), or distil it first (lcmserve distill)",
            param="model",
        )
    return _to_lcm_model(pipe, spec, lora, dev, vae_source=vae)


def _to_lcm_model(pipe, name: str, lora: str | None, device: torch.device, vae_source: str | None = None) -> LCMModel:
    family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    encoders = (pipe.text_encoder, pipe.text_encoder_2) if family == "sdxl" else (pipe.text_encoder,)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2) if family == "sdxl" else (pipe.tokenizer,)
    for module in (pipe.unet, pipe.vae, *encoders):
        module.to(device).eval().requires_grad_(False)
    _upcast_if_needed(pipe.vae, family)
    scheduler_config = dict(pipe.scheduler.config)
    return LCMModel(
        name=name,
        family=family,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoders=tuple(encoders),
        tokenizers=tuple(tokenizers),
        schedule=NoiseSchedule.from_scheduler_config(scheduler_config),
        guidance_mode="embedding" if pipe.unet.config.time_cond_proj_dim is not None else "cfg",
        scheduler_config=scheduler_config,
        lora=lora,
        vae_source=vae_source,
        force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
    )
