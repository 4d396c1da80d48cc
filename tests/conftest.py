"""Shared fixtures: tiny random-weight LCM folders in diffusers format, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Servers the tests start (in-process from the environment, or as `lcmserve serve` subprocesses) run the eager
# reference path: the server's default, auto, compiles for minutes on a first start. Tests of auto pass it.
os.environ.setdefault("LCMSERVE_BACKEND", "torch")
os.environ.setdefault("LCMSERVE_ATTENTION", "sdpa")

import pytest  # noqa: E402
import torch  # noqa: E402

from lcmserve.models.presets import build_preset_pipeline  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def save_preset(name: str, folder, lcm: bool = True, seed: int = 0):
    pipe = build_preset_pipeline(name, lcm=lcm, seed=seed)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lcm_sd_dir(tmp_path_factory):
    return save_preset("tiny-sd", tmp_path_factory.mktemp("lcm-sd"))


@pytest.fixture(scope="session")
def lcm_sd_v_dir(tmp_path_factory):
    return save_preset("tiny-sd-v", tmp_path_factory.mktemp("lcm-sd-v"), seed=3)


@pytest.fixture(scope="session")
def lcm_sdxl_dir(tmp_path_factory):
    return save_preset("tiny-sdxl", tmp_path_factory.mktemp("lcm-sdxl"), seed=1)


@pytest.fixture(scope="session")
def base_sd_dir(tmp_path_factory):
    return save_preset("tiny-sd", tmp_path_factory.mktemp("base-sd"), lcm=False, seed=2)


@pytest.fixture(scope="session")
def base_sdxl_dir(tmp_path_factory):
    return save_preset("tiny-sdxl", tmp_path_factory.mktemp("base-sdxl"), lcm=False, seed=4)


def make_lora(base_dir, out_dir, seed: int = 5):
    """A random LoRA on the base UNet's attention, saved in diffusers' LoRA format."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(base_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(
            LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
        )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(out_dir, unet_lora_layers=layers)
    return out_dir


@pytest.fixture(scope="session")
def lora_sd_dir(base_sd_dir, tmp_path_factory):
    return make_lora(base_sd_dir, tmp_path_factory.mktemp("lora-sd"))


@pytest.fixture(scope="session")
def lora_sdxl_dir(base_sdxl_dir, tmp_path_factory):
    return make_lora(base_sdxl_dir, tmp_path_factory.mktemp("lora-sdxl"), seed=6)


class FailingSampler:
    """The real sampler, except that batches holding the prompt 'boom' raise inside the engine."""

    def __init__(self, sampler) -> None:
        self.inner = sampler

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_rows(self, rows, steps, width, height, on_step=None):
        if any(row.prompt == "boom" for row in rows):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.run_rows(rows, steps, width, height, on_step)
