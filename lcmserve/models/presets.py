"""Architecture presets with random weights, for benchmarks and tests only.

``preset:sd15``, ``preset:sd21`` and ``preset:sdxl`` copy the published diffusers configs of
Stable Diffusion 1.5, 2.1 and XL, with LCM's guidance embedding (``time_cond_proj_dim=256``)
added, so that speed and memory match the real models without downloading them. The
``tiny-*`` presets are the few-hundred-kilobyte models that tests and demos build in
well under a second. Images from any preset are noise: the weights are random.

Decoder presets (``--vae preset:NAME``) swap the model's VAE for another architecture, again
with random weights: ``preset:taesd`` is TAESD's (diffusers' ``AutoencoderTiny``, the tiny
decoder that real-time LCM setups use), for timing it against the full decoder.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

logger = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"
LCM_TIME_COND_PROJ_DIM = 256
TOKENIZER_ASSET = "clip-tokenizer-tiny"

# Published diffusers configs (unet/config.json etc. of the respective model folders).
_SD_VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
_SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    sample_size=64,
)
_SD21_UNET = {
    **_SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
}
_SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
)
_CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu",
)
_OPENCLIP_H = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
    max_position_embeddings=77, vocab_size=49408, projection_dim=512, hidden_act="gelu",
)
_OPENCLIP_BIGG = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu",
)
_SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=True, steps_offset=1, clip_sample=False, prediction_type="epsilon",
)

# Tiny models in the shape of diffusers' own pipeline tests.
_TINY_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=32,
    norm_num_groups=32,
)
_TINY_SDXL_UNET = {
    **_TINY_UNET,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 80,  # 6 time ids x 8 + 32 pooled
    "cross_attention_dim": 64,  # two 32-wide text encoders, concatenated
}
_TINY_VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    sample_size=64,
    norm_num_groups=32,
)
_TINY_CLIP = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
    max_position_embeddings=77, vocab_size=1000, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5,
)

# TAESD's published config (madebyollin/taesd; taesdxl has the same architecture): diffusers' defaults.
_TAESD = dict(
    encoder_block_out_channels=[64, 64, 64, 64], decoder_block_out_channels=[64, 64, 64, 64],
    num_encoder_blocks=[1, 3, 3, 3], num_decoder_blocks=[3, 3, 3, 1], latent_channels=4, act_fn="relu",
    latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0, upsampling_scaling_factor=2,
)
_TINY_TAESD = {  # scale factor 2, as the tiny presets' VAE
    **_TAESD, "encoder_block_out_channels": [16, 16], "decoder_block_out_channels": [16, 16],
    "num_encoder_blocks": [1, 1], "num_decoder_blocks": [1, 1],
}
VAE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {  # name: (diffusers class, config)
    "taesd": ("AutoencoderTiny", _TAESD),
    "tiny-taesd": ("AutoencoderTiny", _TINY_TAESD),
}


@dataclass(frozen=True)
class PresetSpec:
    """One architecture: configs of each module, the family, and the noise schedule."""

    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    schedule: dict[str, Any] = field(default_factory=lambda: dict(_SD_SCHEDULE))
    lcm_time_cond_proj_dim: int = LCM_TIME_COND_PROJ_DIM


PRESETS: dict[str, PresetSpec] = {
    "sd15": PresetSpec("sd", _SD15_UNET, _SD_VAE, (_CLIP_L,)),
    "sd21": PresetSpec(
        "sd", _SD21_UNET, {**_SD_VAE, "sample_size": 768}, (_OPENCLIP_H,),
        schedule={**_SD_SCHEDULE, "prediction_type": "v_prediction"},
    ),
    "sdxl": PresetSpec(
        "sdxl", _SDXL_UNET, {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        (_CLIP_L, _OPENCLIP_BIGG),
    ),
    "tiny-sd": PresetSpec("sd", _TINY_UNET, _TINY_VAE, (_TINY_CLIP,), lcm_time_cond_proj_dim=32),
    "tiny-sd-v": PresetSpec(
        "sd", _TINY_UNET, _TINY_VAE, (_TINY_CLIP,),
        schedule={**_SD_SCHEDULE, "prediction_type": "v_prediction"}, lcm_time_cond_proj_dim=32,
    ),
    "tiny-sdxl": PresetSpec("sdxl", _TINY_SDXL_UNET, _TINY_VAE, (_TINY_CLIP, _TINY_CLIP), lcm_time_cond_proj_dim=32),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> PresetSpec:
    from lcmserve.errors import ModelLoadError

    key = name.removeprefix(PRESET_PREFIX)
    if key not in PRESETS:
        allowed = ", ".join(PRESET_PREFIX + n for n in preset_names())
        raise ModelLoadError(f"model: unknown preset {name!r}; allowed: {allowed}", param="model")
    return PRESETS[key]


def build_preset_vae(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     param: str = "vae") -> torch.nn.Module:
    """A decoder preset (``preset:taesd``, ``preset:tiny-taesd``) with seeded random weights."""
    import diffusers

    from lcmserve.errors import ModelLoadError

    key = name.removeprefix(PRESET_PREFIX)
    if key not in VAE_PRESETS:
        allowed = ", ".join(PRESET_PREFIX + n for n in sorted(VAE_PRESETS))
        raise ModelLoadError(f"{param}: unknown preset {name!r}; allowed: {allowed}", param=param)
    class_name, config = VAE_PRESETS[key]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = getattr(diffusers, class_name)(**copy.deepcopy(config)).eval()
    return vae if dtype == torch.float32 else vae.to(dtype)


def unet_config(spec: PresetSpec, lcm: bool = True) -> dict[str, Any]:
    config = copy.deepcopy(spec.unet)
    if lcm:
        config["time_cond_proj_dim"] = spec.lcm_time_cond_proj_dim
    return config


def tokenizer_path() -> str:
    """The small CLIP tokenizer shipped with the package (see models/tokenizer.py)."""
    return str(resources.files("lcmserve.models") / "assets" / TOKENIZER_ASSET)


def build_preset_pipeline(name: str, *, lcm: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline of the preset's architecture with seeded random weights.

    ``lcm=True`` gives an LCM (guidance embedding, LCMScheduler); ``lcm=False`` the plain
    teacher-style model (no embedding, DDIM scheduler), as a base for LCM-LoRA.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = get_preset(name)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path())

    def text_config(cfg: dict[str, Any]) -> CLIPTextConfig:
        # Special-token ids follow the tokenizer so that pooling finds the real end token.
        return CLIPTextConfig(
            **cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(spec, lcm))
        vae = AutoencoderKL(**spec.vae)
        encoders = [CLIPTextModel(text_config(spec.text_encoders[0]))]
        if spec.family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(text_config(spec.text_encoders[1])))
    scheduler_cls = LCMScheduler if lcm else DDIMScheduler
    scheduler = scheduler_cls(**spec.schedule)
    for module in (unet, vae, *encoders):
        module.eval()
        if dtype != torch.float32:
            module.to(dtype)

    if spec.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer,
            tokenizer_2=copy.deepcopy(tokenizer), unet=unet, scheduler=scheduler,
        )
    pipeline_cls = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
    return pipeline_cls(
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
