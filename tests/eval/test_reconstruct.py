"""The VAE check: the judge's reading of reconstructions separates a trained VAE from an untrained one."""

import json

import torch

from lcmserve.eval.reconstruct import check_vae
from lcmserve.shapes.bundle import TEACHER, bundled


def test_the_check_reads_a_trained_vae_and_fails_a_random_one(tmp_path):
    from diffusers import AutoencoderKL

    from lcmserve.shapes.models import vae_config

    shipped = check_vae(bundled(TEACHER) / "vae", 24, out=tmp_path / "shipped")
    assert shipped.renders["accuracy"] == 1.0 and shipped.reconstructions["accuracy"] > 0.8
    torch.manual_seed(0)
    AutoencoderKL(**vae_config()).save_pretrained(tmp_path / "random")
    random = check_vae(tmp_path / "random", 24)
    assert random.reconstructions["accuracy"] < 0.2 and random.mean_abs_error > 5 * shipped.mean_abs_error
    written = json.loads((tmp_path / "shipped" / "vae-check.json").read_text())
    assert written["reconstructions"] == shipped.reconstructions and written["num_images"] == 24
    assert (tmp_path / "shipped" / "vae-check.png").is_file() and "| reconstructions |" in (
        tmp_path / "shipped" / "vae-check.md").read_text()
