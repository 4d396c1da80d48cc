"""The shipped shapes models: assemble them from training runs, and find them in the package."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch

from lcmserve.errors import ModelLoadError

WEIGHTS = "weights"
TEACHER, CLIP, CLASSIFIER = "shapes-teacher", "shapes-clip", "shapes-classifier.safetensors"


def weights_dir() -> Path:
    return Path(str(resources.files("lcmserve.shapes") / WEIGHTS))


def bundled(name: str) -> Path:
    """Path of a shipped artefact; a clear error when this checkout has not got it yet."""
    path = weights_dir() / name
    if not path.exists():
        raise ModelLoadError(
            f"model: the bundled {name} is not in this installation ({path}); train it with "
            "`lcmserve shapes train ...` and `lcmserve shapes bundle` (docs/shapes.md)", param="model",
        )
    return path


def assemble_teacher(clip_run: str | Path, vae_run: str | Path, teacher_run: str | Path, out: str | Path,
                     dtype: torch.dtype = torch.float16) -> Path:
    """A diffusers StableDiffusionPipeline folder: domain CLIP text tower, VAE, teacher UNet, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    from lcmserve.shapes.models import scheduler_config

    clip = CLIPModel.from_pretrained(Path(clip_run) / "model")
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 nests a CLIPTextModel in CLIPModel; 4.x nests the bare transformer.
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(Path(vae_run) / "model"),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(Path(clip_run) / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(Path(teacher_run) / "unet"),
        scheduler=DDIMScheduler(**scheduler_config(), timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def bundle(clip_run: str | Path, vae_run: str | Path, teacher_run: str | Path, classifier_run: str | Path,
           out: str | Path | None = None) -> Path:
    """Write the teacher, domain CLIP and classifier (float16) where the package looks for them."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPModel, CLIPTokenizer

    out = Path(out) if out else weights_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in (TEACHER, CLIP):
        shutil.rmtree(out / name, ignore_errors=True)
    assemble_teacher(clip_run, vae_run, teacher_run, out / TEACHER)
    CLIPModel.from_pretrained(Path(clip_run) / "model").to(torch.float16).save_pretrained(out / CLIP)
    CLIPTokenizer.from_pretrained(Path(clip_run) / "tokenizer").save_pretrained(out / CLIP)
    state = load_file(Path(classifier_run) / "classifier.safetensors")
    save_file({k: v.to(torch.float16) for k, v in state.items()}, out / CLASSIFIER)
    runs = {"clip": str(clip_run), "vae": str(vae_run), "teacher": str(teacher_run), "classifier": str(classifier_run)}
    configs = {k: json.loads((Path(v) / "config.json").read_text()) for k, v in runs.items()}
    (out / "training-configs.json").write_text(json.dumps(configs, indent=2) + "\n")
    return out
