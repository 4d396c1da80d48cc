"""Architecture presets: the published parameter counts, built without allocating weights."""

import pytest
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lcmserve.models.presets import LCM_TIME_COND_PROJ_DIM, PRESETS, unet_config


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Published sizes: SD1.5 UNet 859.52 M, SD VAE 83.65 M, CLIP ViT-L/14 text 123.06 M,
# SD2.x UNet 865.91 M, OpenCLIP ViT-H text 340.39 M, SDXL UNet 2567.46 M, OpenCLIP bigG text 694.66 M.
@pytest.mark.parametrize(
    "name,unet_m,vae_m,text_m",
    [
        ("sd15", 859.52, 83.65, [123.06]),
        ("sd21", 865.91, 83.65, [340.39]),
        ("sdxl", 2567.46, 83.65, [123.06, 694.66]),
    ],
)
def test_preset_parameter_counts(name, unet_m, vae_m, text_m):
    spec = PRESETS[name]
    with init_empty_weights():
        base = UNet2DConditionModel(**unet_config(spec, lcm=False))
        lcm = UNet2DConditionModel(**unet_config(spec, lcm=True))
        vae = AutoencoderKL(**spec.vae)
        encoders = [
            (CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**cfg))
            for i, cfg in enumerate(spec.text_encoders)
        ]
    assert count(base) / 1e6 == pytest.approx(unet_m, abs=0.005)
    # LCM adds only the guidance embedding's projection (no bias) into the time embedding.
    first_block = spec.unet["block_out_channels"][0]
    assert count(lcm) - count(base) == LCM_TIME_COND_PROJ_DIM * first_block
    assert count(vae) / 1e6 == pytest.approx(vae_m, abs=0.005)
    assert [round(count(e) / 1e6, 2) for e in encoders] == text_m


def test_tiny_preset_builds_and_is_seeded():
    from lcmserve.models.presets import build_preset_pipeline

    a = build_preset_pipeline("tiny-sd", seed=1)
    b = build_preset_pipeline("tiny-sd", seed=1)
    c = build_preset_pipeline("tiny-sd", seed=2)
    key = "conv_in.weight"
    assert (a.unet.state_dict()[key] == b.unet.state_dict()[key]).all()
    assert not (a.unet.state_dict()[key] == c.unet.state_dict()[key]).all()
