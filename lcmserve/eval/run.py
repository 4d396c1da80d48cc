"""`lcmserve eval`: sample each prompt suite with each sampler and step count, then score them.

Rows: one per (suite, sampler, steps). Columns: FID against real renders (domain-CLIP image
features), CLIP score (100 x cosine, as in the LCM paper), accuracy on what the prompts state
and its parts, seconds per image. A real-vs-real row per suite (renders of scenes the prompts
describe against the reference renders) gives the floor any model can reach. Writes eval.json,
eval.md, a PNG grid of samples per row and plots.
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
from lcmserve.eval.judge import ShapesJudge
from lcmserve.eval.metrics import clip_score, frechet_distance, spec_accuracy
from lcmserve.eval.sampling import SAMPLERS, sample
from lcmserve.eval.style import style_share, styled_spec
from lcmserve.eval.suites import SUITES, Prompt, suite_prompts, suite_split
from lcmserve.models.model import DEFAULT_GUIDANCE
from lcmserve.models.registry import bundled_names, resolve_bundled
from lcmserve.shapes.bundle import model_dir
from lcmserve.shapes.data import to_tensor
from lcmserve.shapes.scenes import STYLES, render, scene_for_index
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
    adapter: str | None = None  # a LoRA every row names per request (a style adapter), lcm sampler
    style: str = "plain"  # the style the images should be in: accuracy is scored against what it draws
    num_images: int = 1000  # per suite (the wild suite has 400)
    suites: list[str] = field(default_factory=lambda: ["heldout"])
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
        if (self.lora is not None or self.adapter is not None) and self.samplers != ["lcm"]:
            raise InvalidInputError.out_of_range("sampler", ",".join(self.samplers),
                                                 "lcm alone with a LoRA or an adapter")
        if self.guidance is None:
            self.guidance = DEFAULT_GUIDANCE["cfg"] if self.lora is not None else 8.0
        if not (math.isfinite(self.guidance) and 0 <= self.guidance <= 50):
            raise InvalidInputError.out_of_range("guidance", self.guidance, "a finite number in [0, 50]")
        if not 2 <= self.num_images <= 100_000:
            raise InvalidInputError.out_of_range("num_images", self.num_images, "an integer in [2, 100000]")
        bad = [s for s in self.suites if s not in SUITES]
        if bad or not self.suites:
            raise InvalidInputError.out_of_range("suite", ",".join(self.suites), "a list of " + ", ".join(SUITES))
        if self.style not in STYLES:
            raise InvalidInputError.out_of_range("style", self.style, "one of " + ", ".join(STYLES))
        if self.batch_size < 1:
            raise InvalidInputError.out_of_range("batch_size", self.batch_size, "an integer >= 1")
        if self.clip_dir is not None and not (model_dir(self.clip_dir) / "config.json").is_file():
            raise InvalidInputError(f"clip: {str(self.clip_dir)!r} holds no CLIP model (a bundled shapes-clip folder, or a "
                                    "`shapes train clip` run folder with model/ and tokenizer/)", param="clip")
        if self.classifier is not None and not Path(self.classifier).is_file():
            raise InvalidInputError(f"classifier: {str(self.classifier)!r} is not a file (the classifier's "
                                    ".safetensors, e.g. a `shapes train classifier` run's classifier.safetensors)",
                                    param="classifier")


def resolve_model(spec: str) -> str:
    """A pipeline folder, or a bundled model's name (shapes-teacher, shapes-lcm) as its folder."""
    folder = resolve_bundled(spec)
    if not Path(folder).is_dir():
        raise InvalidInputError(f"model: {spec!r} is neither a folder nor one of {', '.join(bundled_names())}",
                                param="model")
    return folder


def real_images(scenes, style: str = "plain") -> torch.Tensor:
    return to_tensor([render(s, style=style) for s in scenes])


def score(judge, images: torch.Tensor, prompts: list[Prompt], reference_features, style: str = "plain") -> dict:
    """FID, CLIP score, accuracy against what ``style`` draws of each prompt, and the share read in the shifted
    palette (of the images whose prompt states a colour)."""
    feats = judge.image_features(images).numpy()
    row = {"fid": frechet_distance(feats, reference_features)}
    row["clip_score"] = clip_score(judge.image_embeds(images), judge.text_embeds([p.text for p in prompts]))
    reads = judge.read(images)
    row.update(spec_accuracy(reads, [styled_spec(p.spec, style) for p in prompts]))
    row["shifted"] = style_share(reads, [p.spec for p in prompts], "shifted")
    return row


def save_grid(images: torch.Tensor, path: Path, cols: int = 8, scale: int = 2) -> None:
    """All of ``images`` in rows of ``cols``, enlarged ``scale`` times (nearest)."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    h, w = arr.shape[1:3]
    cols = min(cols, len(arr))
    grid = Image.new("RGB", (w * cols, h * -(-len(arr) // cols)), (255, 255, 255))
    for i in range(len(arr)):
        grid.paste(Image.fromarray(arr[i]), ((i % cols) * w, (i // cols) * h))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def run_eval(cfg: EvalConfig) -> dict:
    model = resolve_model(cfg.model)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = ShapesJudge(cfg.clip_dir, cfg.classifier)
    suites = {name: suite_prompts(name, cfg.num_images, cfg.seed) for name in cfg.suites}
    total = len(cfg.samplers) * len(cfg.steps) * sum(len(p) for p in suites.values())
    rows = []
    with tqdm(total=total, desc="eval", unit="img") as bar:
        for suite, prompts in suites.items():
            rows += _eval_suite(cfg, model, device, judge, suite, prompts, out, bar)
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


def _eval_suite(cfg: EvalConfig, model: str, device, judge, suite: str, prompts: list[Prompt], out: Path,
                bar) -> list[dict]:
    """The real-render floor and one row per (sampler, steps) for one suite's prompts."""
    n = len(prompts)
    # The reference set: renders of other scenes of the suite's split (disjoint from the prompts).
    reference = real_images([scene_for_index(i, suite_split(suite), cfg.seed + 1) for i in range(n)], cfg.style)
    ref_feats = judge.image_features(reference).numpy()
    real = real_images([p.scene for p in prompts], cfg.style)
    rows = [{"suite": suite, "sampler": "real renders", "steps": 0, "num_images": n,
             **score(judge, real, prompts, ref_feats, cfg.style), "s_per_image": 0.0}]
    save_grid(real[: cfg.grid_images], out / f"grid-{suite}-real.png")
    captions, seeds = [p.text for p in prompts], [cfg.seed + i for i in range(n)]
    for sampler in cfg.samplers:
        for steps in cfg.steps:
            started = time.perf_counter()
            images = sample(model, sampler, steps, cfg.guidance, captions, seeds, cfg.batch_size, bar.update,
                            device=device, lora=cfg.lora, adapter=cfg.adapter)
            elapsed = time.perf_counter() - started
            rows.append({"suite": suite, "sampler": sampler, "steps": steps, "num_images": n,
                         **score(judge, images, prompts, ref_feats, cfg.style), "s_per_image": elapsed / n})
            save_grid(images[: cfg.grid_images], out / f"grid-{suite}-{sampler}-{steps}.png")
            logger.info("%s", rows[-1])
    return rows


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


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    lora = f" + LoRA `{cfg['lora']}`" if cfg.get("lora") else ""
    lora += f" + adapter `{cfg['adapter']}` on every row" if cfg.get("adapter") else ""
    lora += f", scored against the {cfg['style']} style" if cfg.get("style", "plain") != "plain" else ""
    lines = [
        f"Model `{cfg['model']}`{lora}, guidance {cfg['guidance']}, suites {', '.join(cfg['suites'])}, "
        f"{result['date']}, sampled on {result['machine'].get('device', result['machine']['processor'])}, "
        f"torch {result['versions']['torch']}. Accuracy counts only what each prompt states ('-': no prompt "
        "states it). Shifted: of the images whose prompt states a colour, the share drawn in the shifted palette "
        "(eval/style.py).",
        "",
        "| suite | N | sampler | steps | FID | CLIP score | accuracy | count | shape | colour | size | layout | "
        "background | shifted | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        parts = " | ".join(_cell(r.get(k)) for k in ("count", "shape", "colour", "size", "layout", "background"))
        lines.append(f"| {r.get('suite', '-')} | {r.get('num_images', cfg['num_images'])} | {r['sampler']} | "
                     f"{r['steps'] or '-'} | {r['fid']:.1f} | {r['clip_score']:.2f} | {r['accuracy']:.3f} | {parts} | "
                     f"{_cell(r.get('shifted'))} | {r['s_per_image']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    rows = result["rows"]
    for ax, key, label in zip(axes, ("fid", "clip_score", "accuracy"), ("FID (lower is better)", "CLIP score",
                                                                         "accuracy on stated attributes")):
        for suite in dict.fromkeys(r.get("suite", "-") for r in rows):
            mine = [r for r in rows if r.get("suite", "-") == suite]
            for sampler in dict.fromkeys(r["sampler"] for r in mine if r["steps"]):
                series = [r for r in mine if r["sampler"] == sampler]
                ax.plot([r["steps"] for r in series], [r[key] for r in series], marker="o", label=f"{suite} {sampler}")
            floor = [r for r in mine if not r["steps"]]
            if floor and len(result["config"]["suites"]) == 1:
                ax.axhline(floor[0][key], color="gray", linestyle="--", label="real renders")
        ax.set_xscale("log", base=2)
        steps = sorted({r["steps"] for r in rows if r["steps"]})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("steps")
        ax.set_title(label)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
