"""The shipped shapes models: assemble them from training runs, and find them in the package."""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from lcmserve.distill.config import CONFIG_FILE, SUMMARY_FILE
from lcmserve.errors import ModelLoadError

WEIGHTS = "weights"
TEACHER, CLIP, CLASSIFIER = "shapes-teacher", "shapes-clip", "shapes-classifier.safetensors"
LCM = "shapes-lcm"
LORA = "shapes-lcm-lora"  # an LCM-LoRA of the teacher: serve with --model shapes-teacher --lora shapes-lcm-lora
SHIFTED = "shapes-lcm-shifted"  # a style adapter of the LCM (the shifted palette): served as `shifted` beside it
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, as `lcmserve distill lora` writes it


def weights_dir() -> Path:
    return Path(str(resources.files("lcmserve.shapes") / WEIGHTS))


def bundled(name: str, param: str = "model") -> Path:
    """Path of a shipped artefact; a clear error when this checkout has not got it yet."""
    path = weights_dir() / name
    if not path.exists():
        raise ModelLoadError(
            f"{param}: the bundled {name} is not in this installation ({path}); train it with "
            "`lcmserve shapes train ...` / `lcmserve distill` and `lcmserve shapes bundle` (docs/shapes.md)",
            param=param,
        )
    return path


def model_dir(run: str | Path, part: str = "model") -> Path:
    """A stage's weights: ``run/model`` for a training run folder, else the folder itself (shipped layout)."""
    run = Path(run)
    return run / part if (run / part).is_dir() else run


def resolve_run(run: str | Path | None, stage: str) -> Path | None:
    """``shipped`` names the component inside the package (to retrain one stage on top of the others)."""
    if run != "shipped":
        return Path(run) if run else None
    return {"clip": bundled(CLIP), "vae": bundled(TEACHER) / "vae", "teacher": bundled(TEACHER),
            "classifier": bundled(CLASSIFIER)}[stage]


def clip_text_encoder(clip_run: str | Path):
    """The domain CLIP's text tower as a standalone float32 ``CLIPTextModel``."""
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(model_dir(clip_run), dtype=torch.float32)
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 nests a CLIPTextModel in CLIPModel; 4.x nests the bare transformer.
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    return text_encoder


def assemble_teacher(clip_run: str | Path, vae_run: str | Path, teacher_run: str | Path, out: str | Path,
                     dtype: torch.dtype = torch.float16) -> Path:
    """A diffusers StableDiffusionPipeline folder: domain CLIP text tower, VAE, teacher UNet, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lcmserve.shapes.models import scheduler_config

    own = Path(teacher_run) / "text_encoder"
    if (own / "config.json").is_file():  # the text encoder the teacher learnt with (trained, or a copy)
        text_encoder = CLIPTextModel.from_pretrained(own, dtype=torch.float32)
    else:
        text_encoder = clip_text_encoder(clip_run)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(model_dir(vae_run), dtype=torch.float32),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(own.parent / "tokenizer" if (own.parent / "tokenizer").is_dir()
                                                else model_dir(clip_run, "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(model_dir(teacher_run, "unet"), dtype=torch.float32),
        scheduler=DDIMScheduler(**scheduler_config(), timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def assemble_lcm(lcm_run: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """The distilled LCM (a ``lcmserve distill lcd`` output folder) as a float16 diffusers folder."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_run, dtype=torch.float32, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def assemble_lora(lora_run: str | Path, out: str | Path) -> Path:
    """The adapter of a ``lcmserve distill lora`` output folder as float16, its metadata (the adapter's
    rank and alpha, which diffusers' loader reads) kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(Path(lora_run) / LORA_FILE), "pt") as f:
        metadata, names = f.metadata(), f.keys()  # a safetensors file handle, not a dict
        state = {k: f.get_tensor(k).to(torch.float16) for k in names}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(state, Path(out) / LORA_FILE, metadata=metadata)
    return Path(out)


def _run_recipe(run: str | Path) -> dict:
    """A distillation run's config and summary (``distill-config.json`` + ``distill.json``), losses left out."""
    recipe = {}
    for name in (CONFIG_FILE, SUMMARY_FILE):
        if (Path(run) / name).is_file():
            recipe.update(json.loads((Path(run) / name).read_text()))
    recipe.pop("losses", None)
    return recipe


def _drop_build_path(config: Path) -> None:
    """Remove ``_name_or_path`` (the folder the weights were loaded from, e.g. a scratch run folder)
    from a saved diffusers config: it is bookkeeping that would ship the builder's paths. The
    recipe chain in training-configs.json is where a bundle records where its weights came from."""
    data = json.loads(config.read_text())
    if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _bundle_recipe(init: str | None, stage: str) -> dict | None:
    """The recorded recipe of ``stage`` in the bundle that ``init`` (a pipeline folder of a bundle,
    or a model folder inside one) belongs to, or None when it is not part of a bundle."""
    if not init:
        return None
    for folder in list(Path(init).resolve().parents)[:2]:
        record = folder / "training-configs.json"
        if record.is_file():
            return json.loads(record.read_text()).get(stage)
    return None


def _init_recipe(init: str | None, stage: str, key: str, seen: frozenset = frozenset()) -> dict | None:
    """The recipe of the weights a run started from (its ``init_unet`` or ``init_student``): the
    recorded one when they are a bundle's, else that run folder's own config, followed back the same
    way, so a teacher continued over several runs records every run. None when nothing is recorded."""
    if not init:
        return None
    recorded = _bundle_recipe(init, stage)
    if recorded is not None:
        return recorded
    folder = Path(init).resolve()
    if folder in seen:
        return None
    if (folder / CONFIG_FILE).is_file():  # a distillation run
        recipe = _run_recipe(folder)
    elif (folder / "config.json").is_file() and '"stage"' in (folder / "config.json").read_text():
        recipe = json.loads((folder / "config.json").read_text())  # a `shapes train` run
    else:
        return None
    earlier = _init_recipe(recipe.get(key), stage, key, seen | {folder})
    if earlier is not None:
        recipe[f"{key}_recipe"] = earlier
    return recipe


def bundle(clip_run: str | Path, vae_run: str | Path, teacher_run: str | Path, classifier_run: str | Path,
           out: str | Path | None = None, lcm_run: str | Path | None = None,
           lora_run: str | Path | None = None, shifted_run: str | Path | None = None) -> Path:
    """Write the teacher, domain CLIP and classifier (float16) where the package looks for them.

    ``lcm_run`` (a ``distill lcd`` output folder) also writes the shipped LCM, ``shapes-lcm``;
    ``lora_run`` (a ``distill lora`` output folder) the shipped LCM-LoRA, ``shapes-lcm-lora``;
    ``shifted_run`` (a ``distill lcf --lcf-adapter`` output folder on the shipped LCM) the style adapter
    ``shapes-lcm-shifted``.
    """
    from safetensors.torch import load_file, save_file
    from transformers import CLIPModel, CLIPTokenizer

    out = Path(out) if out else weights_dir()
    out.mkdir(parents=True, exist_ok=True)
    clip_run, vae_run, teacher_run, classifier_run = (
        resolve_run(r, s) for r, s in ((clip_run, "clip"), (vae_run, "vae"), (teacher_run, "teacher"),
                                       (classifier_run, "classifier")))
    classifier_file = classifier_run if classifier_run.is_file() else classifier_run / "classifier.safetensors"
    # Build in a temporary folder first: the inputs may be the shipped weights being replaced.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        assemble_teacher(clip_run, vae_run, teacher_run, tmp / TEACHER)
        CLIPModel.from_pretrained(model_dir(clip_run)).to(torch.float16).save_pretrained(tmp / CLIP)
        CLIPTokenizer.from_pretrained(model_dir(clip_run, "tokenizer")).save_pretrained(tmp / CLIP)
        state = load_file(classifier_file)
        save_file({k: v.to(torch.float16) for k, v in state.items()}, tmp / CLASSIFIER)
        names = [TEACHER, CLIP, CLASSIFIER]
        if lcm_run is not None:
            assemble_lcm(lcm_run, tmp / LCM)
            names.append(LCM)
        if lora_run is not None:
            assemble_lora(lora_run, tmp / LORA)
            names.append(LORA)
        if shifted_run is not None:
            assemble_lora(shifted_run, tmp / SHIFTED)
            names.append(SHIFTED)
        for config in [*tmp.rglob("config.json"), *tmp.rglob("model_index.json")]:  # the diffusers configs
            _drop_build_path(config)
        for name in names:
            shutil.rmtree(out / name, ignore_errors=True)
            (tmp / name).rename(out / name)
    runs = {"clip": str(clip_run), "vae": str(vae_run), "teacher": str(teacher_run), "classifier": str(classifier_run)}
    configs = {k: json.loads((Path(v) / "config.json").read_text()) for k, v in runs.items()
               if (Path(v) / "config.json").is_file() and "stage" in (Path(v) / "config.json").read_text()}
    previous = out / "training-configs.json"
    if not previous.exists():  # a new folder (-o): the shipped stages' recipes are the package's
        previous = weights_dir() / "training-configs.json"
    recorded = json.loads(previous.read_text()) if previous.exists() else {}
    for stage, name in (("lcm", LCM), ("lora", LORA), ("shifted", SHIFTED)):
        if not (out / name).exists():
            recorded.pop(stage, None)
    teacher_cfg = configs.get("teacher", {})
    init_recipe = _init_recipe(teacher_cfg.get("init_unet"), "teacher", "init_unet")
    if init_recipe is not None:
        # continued from earlier weights (a bundle's or another run's): keep the recipe they came from
        teacher_cfg["init_unet_recipe"] = init_recipe
    if lcm_run is not None:
        configs["lcm"] = _run_recipe(lcm_run)
        init_recipe = _init_recipe(configs["lcm"].get("init_student"), "lcm", "init_student")
        if init_recipe is not None:
            configs["lcm"]["init_student_recipe"] = init_recipe
    if lora_run is not None:
        configs["lora"] = _run_recipe(lora_run)
    if shifted_run is not None:
        configs["shifted"] = _run_recipe(shifted_run)
    configs = {**recorded, **configs}  # a stage taken from the shipped weights keeps its recorded recipe
    (out / "training-configs.json").write_text(json.dumps(configs, indent=2) + "\n")
    return out
