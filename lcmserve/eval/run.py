"""`lcmserve eval`: sample held-out prompts with each sampler and step count, then score them.

Rows: one per (sampler, steps). Columns: FID against real renders (domain-CLIP image
features), CLIP score (100 x cosine, as in the LCM paper), exact attribute accuracy and its
parts, seconds per image. A real-vs-real row (renders of the prompts' own scenes against the
reference renders) gives the floor any model can reach. Writes eval.json, eval.md, a PNG
grid of samples per row and plots.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from lcmserve import __version__
from lcmserve.errors import InvalidInputError
from lcmserve.eval.judge import ShapesJudge, scene_key
from lcmserve.eval.metrics import attribute_accuracy, clip_score, frechet_distance
from lcmserve.eval.sampling import SAMPLERS, sample
from lcmserve.models.model import DEFAULT_GUIDANCE
from lcmserve.models.registry import bundled_names, resolve_bundled
from lcmserve.shapes.data import to_tensor
from lcmserve.shapes.scenes import SPLITS, caption_for_index, render, scene_for_index
from lcmserve.shapes.train import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """One evaluation run."""

    model: str  # a diffusers folder, or shapes-teacher / shapes-lcm (the bundled models)
    samplers: list[str] = field(default_factory=lambda: ["lcm"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    guidance: float | None = None  # None: 8, or 1 with a LoRA (an LCM-LoRA's default: no guidance)
    lora: str | None = None  # an LCM-LoRA fused into ``model`` (a base model) for the lcm sampler
    num_images: int = 1000
    split: str = "heldout"
    seed: int = 1000  # prompts are scenes seed..; image i uses seed + i
    batch_size: int = 64
    out: str = "out/eval"
    grid_images: int = 8
    clip_dir: str | None = None  # judges; the bundled ones by default
    classifier: str | None = None
    device: str = "auto"  # where the samplers run (auto: the GPU when there is one); the judges run on the CPU

    def __post_init__(self) -> None:
        resolve_device(self.device)

        bad = [s for s in self.samplers if s not in SAMPLERS]
        if bad or not self.samplers:
            raise InvalidInputError.out_of_range("sampler", ",".join(self.samplers), "a list of " + ", ".join(SAMPLERS))
        if not self.steps or any(not isinstance(s, int) or not 1 <= s <= 1000 for s in self.steps):
            raise InvalidInputError.out_of_range("steps", self.steps, "a list of integers in [1, 1000]")
        if "lcm" in self.samplers and max(self.steps) > 8:
            raise InvalidInputError.out_of_range("steps", self.steps, "at most 8 for the lcm sampler")
        if self.lora is not None and self.samplers != ["lcm"]:
            raise InvalidInputError.out_of_range("sampler", ",".join(self.samplers), "lcm alone with a LoRA")
        if self.guidance is None:
            self.guidance = DEFAULT_GUIDANCE["cfg"] if self.lora is not None else 8.0
        if not (math.isfinite(self.guidance) and 0 <= self.guidance <= 50):
            raise InvalidInputError.out_of_range("guidance", self.guidance, "a finite number in [0, 50]")
        if not 2 <= self.num_images <= 100_000:
            raise InvalidInputError.out_of_range("num_images", self.num_images, "an integer in [2, 100000]")
        if self.split not in SPLITS:
            raise InvalidInputError.out_of_range("split", self.split, "one of " + ", ".join(SPLITS))
        if self.batch_size < 1:
            raise InvalidInputError.out_of_range("batch_size", self.batch_size, "an integer >= 1")


def resolve_model(spec: str) -> str:
    """A pipeline folder, or a bundled model's name (shapes-teacher, shapes-lcm) as its folder."""
    folder = resolve_bundled(spec)
    if not Path(folder).is_dir():
        raise InvalidInputError(f"model: {spec!r} is neither a folder nor one of {', '.join(bundled_names())}",
                                param="model")
    return folder


def prompts(cfg: EvalConfig):
    pairs = [caption_for_index(i, cfg.split, cfg.seed) for i in range(cfg.num_images)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def real_images(scenes) -> torch.Tensor:
    return to_tensor([render(s) for s in scenes])


def score(judge, images: torch.Tensor, captions, targets, reference_features) -> dict[str, float]:
    feats = judge.image_features(images).numpy()
    row = {"fid": frechet_distance(feats, reference_features)}
    row["clip_score"] = clip_score(judge.image_embeds(images), judge.text_embeds(list(captions)))
    row.update(attribute_accuracy(judge.read(images), targets))
    return row


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    n = min(len(images), cols)
    arr = (images[:n].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    h, w = arr.shape[1:3]
    grid = Image.new("RGB", (w * n, h))
    for i in range(n):
        grid.paste(Image.fromarray(arr[i]), (i * w, 0))
    grid.resize((w * n * 2, h * 2), Image.Resampling.NEAREST).save(path)


def run_eval(cfg: EvalConfig) -> dict:
    model = resolve_model(cfg.model)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = ShapesJudge(cfg.clip_dir, cfg.classifier)
    scenes, captions = prompts(cfg)
    targets = [scene_key(s) for s in scenes]
    seeds = [cfg.seed + i for i in range(cfg.num_images)]
    # The reference set: renders of other scenes of the same split (disjoint from the prompts).
    reference = real_images([scene_for_index(i, cfg.split, cfg.seed + 1) for i in range(cfg.num_images)])
    ref_feats = judge.image_features(reference).numpy()
    real = real_images(scenes)
    rows = [{"sampler": "real renders", "steps": 0, **score(judge, real, captions, targets, ref_feats),
             "s_per_image": 0.0}]
    save_grid(real, out / "grid-real.png", cfg.grid_images)
    total = len(cfg.samplers) * len(cfg.steps) * cfg.num_images
    with tqdm(total=total, desc="eval", unit="img") as bar:
        for sampler in cfg.samplers:
            for steps in cfg.steps:
                started = time.perf_counter()
                images = sample(model, sampler, steps, cfg.guidance, captions, seeds, cfg.batch_size, bar.update,
                                device=device, lora=cfg.lora)
                elapsed = time.perf_counter() - started
                row = {"sampler": sampler, "steps": steps, **score(judge, images, captions, targets, ref_feats),
                       "s_per_image": elapsed / cfg.num_images}
                rows.append(row)
                save_grid(images, out / f"grid-{sampler}-{steps}.png", cfg.grid_images)
                logger.info("%s", row)
    result = {
        "config": asdict(cfg), "model_path": model, "rows": rows, "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(), "device": _device_name(device)},
        "versions": _versions(),
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown_table(result))
    plot(result, out / "eval.png")
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from lcmserve.engine.bench import _cpu_name

    return _cpu_name()


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"lcmserve": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    lora = f" + LoRA `{cfg['lora']}`" if cfg.get("lora") else ""
    lines = [
        f"Model `{cfg['model']}`{lora}, guidance {cfg['guidance']}, {cfg['num_images']} {cfg['split']} prompts, "
        f"{result['date']}, sampled on {result['machine'].get('device', result['machine']['processor'])}, "
        f"torch {result['versions']['torch']}.",
        "",
        "| sampler | steps | FID | CLIP score | accuracy | shape | colour | size | layout | background | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['sampler']} | {r['steps'] or '-'} | {r['fid']:.1f} | {r['clip_score']:.2f} | {r['accuracy']:.3f} | "
            f"{r['shape']:.3f} | {r['colour']:.3f} | {r['size']:.3f} | {r['layout']:.3f} | {r['background']:.3f} | "
            f"{r['s_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    floor = result["rows"][0]
    for ax, key, label in zip(axes, ("fid", "clip_score", "accuracy"), ("FID (lower is better)", "CLIP score",
                                                                         "attribute accuracy")):
        for sampler in dict.fromkeys(r["sampler"] for r in result["rows"][1:]):
            rows = [r for r in result["rows"] if r["sampler"] == sampler]
            ax.plot([r["steps"] for r in rows], [r[key] for r in rows], marker="o", label=sampler)
        ax.axhline(floor[key], color="gray", linestyle="--", label="real renders")
        ax.set_xscale("log", base=2)
        steps = sorted({r["steps"] for r in result["rows"][1:]})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("steps")
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
