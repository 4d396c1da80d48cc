"""How cleanly a VAE gives scenes back: the judge reads renders after an encode and a decode.

The teacher and every model distilled from it draw through the VAE's decoder, so they cannot be
more accurate than the judge's reading of its reconstructions. Scored on held-out scenes (never
seen by the VAE), with the reconstruction of the posterior mean (what a sampler's final latent
stands for), and written with a grid of renders above their reconstructions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from lcmserve import __version__
from lcmserve.eval.judge import ShapesJudge, scene_key
from lcmserve.eval.metrics import attribute_accuracy
from lcmserve.eval.run import real_images, save_grid
from lcmserve.shapes.scenes import scene_for_index


@dataclass
class ReconstructionReport:
    vae: str
    num_images: int
    reconstructions: dict[str, float]  # attribute_accuracy of the judge on reconstructions
    renders: dict[str, float]  # ... and on the renders themselves (the ceiling)
    mean_abs_error: float  # per pixel, in [0, 1] units


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """images in [0, 1] -> decode(encode(x).mean) in [0, 1]."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="vae", leave=False):
        x = images[i : i + batch_size] * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def check_vae(vae_dir: str | Path, num_images: int = 400, seed: int = 5000, out: str | Path | None = None,
              grid_images: int = 16) -> ReconstructionReport:
    """Judge reconstructions of ``num_images`` held-out scenes; with ``out``, write vae-check.json/.md and a grid."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).eval()
    scenes = [scene_for_index(i, "heldout", seed) for i in range(num_images)]
    images = real_images(scenes)
    recon = reconstruct(vae, images)
    judge = ShapesJudge()
    targets = [scene_key(s) for s in scenes]
    report = ReconstructionReport(str(vae_dir), num_images, attribute_accuracy(judge.read(recon), targets),
                                  attribute_accuracy(judge.read(images), targets),
                                  float((recon - images).abs().mean()))
    if out is not None:
        write_report(report, images[:grid_images], recon[:grid_images], Path(out))
    return report


def write_report(report: ReconstructionReport, images: torch.Tensor, recon: torch.Tensor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from lcmserve.engine.bench import _cpu_name

    meta = {"date": date.today().isoformat(), "machine": _cpu_name(),
            "torch": torch.__version__, "lcmserve": __version__}
    (out / "vae-check.json").write_text(json.dumps({**report.__dict__, **meta}, indent=2) + "\n")
    # Renders on the odd rows, their reconstructions on the even ones, 8 per row, 4x enlarged.
    rows = [t for i in range(0, len(images), 8) for t in (images[i : i + 8], recon[i : i + 8])]
    save_grid(torch.cat(rows), out / "vae-check.png", cols=8, scale=4)
    r, p = report.reconstructions, report.renders
    lines = [f"# VAE reconstructions: {report.vae}", "",
             f"{report.num_images} held-out scenes (the posterior mean decoded); {meta['date']}, on {meta['machine']}, "
             f"torch {meta['torch']}, lcmserve {meta['lcmserve']}.",
             "", "| images | exact | shape | colour | size | layout | background |", "|---|---|---|---|---|---|---|"]
    for name, acc in (("renders", p), ("reconstructions", r)):
        lines.append(f"| {name} | {acc['accuracy']:.3f} | {acc['shape']:.3f} | {acc['colour']:.3f} | "
                     f"{acc['size']:.3f} | {acc['layout']:.3f} | {acc['background']:.3f} |")
    lines += ["", f"Mean absolute pixel error: {report.mean_abs_error:.4f}.", "",
              "![renders (odd rows) above their reconstructions](vae-check.png)", ""]
    (out / "vae-check.md").write_text("\n".join(lines))
