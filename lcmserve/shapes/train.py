"""Training recipes of the shapes family: domain CLIP, VAE, teacher UNet and the judge.

Each stage is a ``StageConfig`` plus a step function. The shared loop gives every stage a
progress bar, bf16 autocast, a checkpoint every ``checkpoint_every`` steps (written
atomically), resume from the last checkpoint with the same data order (batches are a pure
function of seed and step), and the resolved config saved beside the weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lcmserve.errors import InvalidInputError
from lcmserve.shapes import models as M
from lcmserve.shapes.data import batch_for_step, scene_targets
from lcmserve.shapes.scenes import BACKGROUNDS

logger = logging.getLogger(__name__)

STAGES = ("clip", "vae", "teacher", "classifier")
_DEFAULTS = {
    "clip": dict(steps=1000, batch_size=128, lr=5e-4),
    "vae": dict(steps=2000, batch_size=16, lr=1e-3),
    "teacher": dict(steps=2000, batch_size=32, lr=3e-4),
    "classifier": dict(steps=1500, batch_size=64, lr=2e-3),
}


@dataclass
class StageConfig:
    """One training run of one stage."""

    stage: str
    out: str  # run folder: checkpoint.pt, config.json and the final weights
    steps: int = 0  # 0 takes the stage's default
    batch_size: int = 0
    lr: float = 0.0
    seed: int = 0
    checkpoint_every: int = 250
    warmup_steps: int = 100
    bf16: bool = False  # autocast; pays off only on CPUs with native bf16 (AVX-512 BF16 / AMX) or GPUs
    clip_dir: str | None = None  # teacher: the trained domain CLIP (text encoder + tokenizer)
    vae_dir: str | None = None  # teacher: the trained VAE
    caption_dropout: float = 0.1  # teacher: empty captions, for classifier-free guidance
    ema_decay: float = 0.999  # teacher
    latent_cache: int = 20000  # teacher: scenes pre-encoded by the VAE once (0: render and encode every step)
    init_unet: str | None = None  # teacher: start from this UNet (a diffusers unet folder or a pipeline folder)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InvalidInputError.out_of_range("stage", self.stage, "one of " + ", ".join(STAGES))
        for key, value in _DEFAULTS[self.stage].items():
            if not getattr(self, key):
                setattr(self, key, value)
        for key in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise InvalidInputError.out_of_range(key, getattr(self, key), "an integer >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInputError.out_of_range("lr", self.lr, "a finite number > 0")
        if not 0 <= self.caption_dropout < 1:
            raise InvalidInputError.out_of_range("caption_dropout", self.caption_dropout, "in [0, 1)")
        if self.warmup_steps < 0:
            raise InvalidInputError.out_of_range("warmup_steps", self.warmup_steps, "an integer >= 0")
        if self.latent_cache < 0:
            raise InvalidInputError.out_of_range("latent_cache", self.latent_cache, "an integer >= 0")
        if self.init_unet == "shipped":
            from lcmserve.shapes.bundle import resolve_run

            self.init_unet = str(resolve_run("shipped", "teacher"))
        if self.init_unet and not Path(self.init_unet).is_dir():
            raise InvalidInputError(f"init_unet: no such folder {self.init_unet!r}", param="init_unet")
        if not 0 < self.ema_decay < 1:
            raise InvalidInputError.out_of_range("ema_decay", self.ema_decay, "in (0, 1)")
        if self.stage == "teacher":
            from lcmserve.shapes.bundle import resolve_run

            for key in ("clip_dir", "vae_dir"):
                path = getattr(self, key)
                if path == "shipped":
                    setattr(self, key, str(resolve_run(path, key[:-4])))
                elif not path or not Path(path).is_dir():
                    raise InvalidInputError(
                        f"{key}: the teacher needs a trained {key[:-4]} folder (train it first with "
                        f"`lcmserve shapes train {key[:-4]}`); got {path!r}", param=key,
                    )


def _autocast(cfg: StageConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_loop(cfg: StageConfig, modules: dict[str, torch.nn.Module], params, step_fn: Callable[[int], torch.Tensor],
             extra_state: dict | None = None) -> list[float]:
    """The shared loop: AdamW + warmup/cosine, checkpoints, resume, progress. Returns the losses."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    start, losses = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        for name, obj in (extra_state or {}).items():
            obj.load_state_dict(state["extra"][name])
        start, losses = state["step"], state["losses"]
        logger.info("resuming %s from step %d", cfg.stage, start)

    def save(step: int) -> None:
        _save_atomic({
            "step": step, "losses": losses, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "extra": {n: o.state_dict() for n, o in (extra_state or {}).items()},
        }, ckpt)

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    for step in range(start, cfg.steps):
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        for obj in (extra_state or {}).values():
            if hasattr(obj, "step"):
                obj.step(params)
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    bar.close()
    logger.info("%s: %d steps in %.0f s", cfg.stage, cfg.steps - start, time.perf_counter() - started)
    return losses


# -- stage 1: the domain CLIP --------------------------------------------------------------
def train_clip(cfg: StageConfig) -> Path:
    from transformers import CLIPModel

    out = Path(cfg.out)
    tokenizer = M.write_tokenizer(out / "tokenizer")
    torch.manual_seed(cfg.seed)
    model = CLIPModel(M.clip_config(tokenizer)).train()

    def step_fn(step: int) -> torch.Tensor:
        _, captions, images = batch_for_step(cfg.seed, "clip", step, cfg.batch_size)
        ids = tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        with _autocast(cfg):
            return model(input_ids=ids, pixel_values=images * 2 - 1, return_loss=True).loss.float()

    run_loop(cfg, {"clip": model}, list(model.parameters()), step_fn)
    model.eval().save_pretrained(out / "model")
    return out


# -- stage 2: the VAE ------------------------------------------------------------------------
def train_vae(cfg: StageConfig) -> Path:
    from diffusers import AutoencoderKL

    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**M.vae_config()).train()
    kl_weight = float(cfg.extra.get("kl_weight", 1e-6))
    # Objects cover 2-10% of the pixels: unweighted, the loss is all background and the VAE
    # learns to drop small objects and wash out colours. Object pixels weigh fg_weight times more.
    fg_weight = float(cfg.extra.get("fg_weight", 10.0))

    def step_fn(step: int) -> torch.Tensor:
        scenes, _, images = batch_for_step(cfg.seed, "vae", step, cfg.batch_size)
        x = images * 2 - 1
        background = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32) / 255
        mask = ((images - background[:, :, None, None]).abs().sum(1, keepdim=True) > 0.1).float()
        weight = 1 + (fg_weight - 1) * mask
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with _autocast(cfg):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample.float()
        err = recon - x
        rec = ((err.abs() + err**2) * weight).sum() / (weight.sum() * 3)
        return rec + kl_weight * posterior.kl().mean().float()

    run_loop(cfg, {"vae": vae}, list(vae.parameters()), step_fn)
    vae.eval()
    # Scale latents to unit variance, as Rombach et al. (2022) do for SD's VAE.
    with torch.no_grad():
        _, _, images = batch_for_step(cfg.seed, "vae-scale", 0, 512)
        latents = vae.encode(images * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "model")
    return out


# -- stage 3: the teacher -------------------------------------------------------------------
def _file_digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_latent_cache(vae, vae_dir: Path, seed: int, n: int, path: Path, batch_size: int = 64) -> dict:
    """Render and VAE-encode ``n`` training scenes once (the encoder costs as much as a UNet step).

    Scenes are ``scene_for_index(i, "train", seed)``; the posterior's mean and std are kept so
    every step still samples a fresh latent, and captions are still drawn afresh every step.
    The file is keyed by the VAE's weights, the seed and ``n``: another VAE rebuilds it.
    """
    from lcmserve.shapes.data import to_tensor
    from lcmserve.shapes.scenes import render, scene_for_index

    key = f"{_file_digest(vae_dir)}:{seed}:{n}"
    if path.exists():
        cache = torch.load(path, weights_only=False)
        if cache.get("key") == key:
            return cache
        logger.warning("latent cache %s was built for another VAE or size; rebuilding", path)
    means, stds = [], []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="encode scenes", unit="batch", dynamic_ncols=True):
            scenes = [scene_for_index(i, "train", seed) for i in range(start, min(n, start + batch_size))]
            dist = vae.encode(to_tensor([render(sc) for sc in scenes]) * 2 - 1).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    cache = {"key": key, "mean": torch.cat(means), "std": torch.cat(stds)}
    _save_atomic(cache, path)
    return cache


def train_teacher(cfg: StageConfig) -> Path:
    import random

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPModel, CLIPTokenizer

    from lcmserve.shapes.scenes import caption, scene_for_index

    from lcmserve.shapes.bundle import model_dir

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir(cfg.clip_dir, "tokenizer"))
    clip = CLIPModel.from_pretrained(model_dir(cfg.clip_dir), dtype=torch.float32)
    text_encoder = clip.text_model.eval().requires_grad_(False)
    vae_dir = model_dir(cfg.vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(M.scheduler_config())
    torch.manual_seed(cfg.seed)
    if cfg.init_unet:
        init = Path(cfg.init_unet)
        init = init / "unet" if (init / "unet").is_dir() else init
        unet = UNet2DConditionModel.from_pretrained(init, dtype=torch.float32).train()
    else:
        unet = UNet2DConditionModel(**M.unet_config()).train()
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    cache = None
    if cfg.latent_cache:
        cache = build_latent_cache(vae, vae_dir, cfg.seed, cfg.latent_cache, out / "latent-cache.pt")
        scenes = [scene_for_index(i, "train", cfg.seed) for i in range(cfg.latent_cache)]

    def data(step: int, gen: torch.Generator) -> tuple[list[str], torch.Tensor]:
        if cache is None:
            _, captions, images = batch_for_step(cfg.seed, "teacher", step, cfg.batch_size)
            with torch.no_grad():
                return captions, vae.encode(images * 2 - 1).latent_dist.sample(generator=gen)
        rng = random.Random(f"{cfg.seed}:teacher:{step}")
        idx = [rng.randrange(cfg.latent_cache) for _ in range(cfg.batch_size)]
        captions = [caption(scenes[i], rng) for i in idx]
        mean, std = cache["mean"][idx], cache["std"][idx]
        return captions, mean + std * torch.randn(mean.shape, generator=gen)

    def step_fn(step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        captions, latents = data(step, gen)
        latents = latents * vae.config.scaling_factor
        # 1. caption dropout: the unconditional model for classifier-free guidance
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
            states = text_encoder(ids)[0]
        # 2. forward diffusion to a uniform random timestep, epsilon target
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(captions),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with _autocast(cfg):
            pred = unet(noisy, t, encoder_hidden_states=states).sample.float()
        return F.mse_loss(pred, noise)

    run_loop(cfg, {"unet": unet}, list(unet.parameters()), step_fn, extra_state={"ema": ema})
    ema.copy_to(unet.parameters())
    unet.eval().save_pretrained(out / "unet")
    return out


# -- stage 4: the judge ---------------------------------------------------------------------
def classifier_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["shape"].flatten(0, 1), targets["shape"].flatten())
    loss = loss + F.cross_entropy(logits["background"], targets["background"])
    for head in ("colour", "size"):
        mask = targets[head].flatten() >= 0
        loss = loss + F.cross_entropy(logits[head].flatten(0, 1)[mask], targets[head].flatten()[mask])
    return loss


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and slight brightness shifts: the judge must read imperfect generated images."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(b, 1, 1, 1, generator=gen) < 0.3).float()
    images = use_blur * blur + (1 - use_blur) * images
    images = images * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5))
    sigma = 0.08 * torch.rand(b, 1, 1, 1, generator=gen)
    return (images + sigma * torch.randn(images.shape, generator=gen)).clamp(0, 1)


def train_classifier(cfg: StageConfig) -> Path:
    from safetensors.torch import save_file

    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    model = M.SceneClassifier().train()

    def step_fn(step: int) -> torch.Tensor:
        scenes, _, images = batch_for_step(cfg.seed, "classifier", step, cfg.batch_size, ("train", "heldout"))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with _autocast(cfg):
            logits = model(augment(images, gen))
        return classifier_loss({k: v.float() for k, v in logits.items()}, scene_targets(scenes))

    run_loop(cfg, {"classifier": model}, list(model.parameters()), step_fn)
    save_file(model.eval().state_dict(), out / "classifier.safetensors")
    return out


TRAINERS = {"clip": train_clip, "vae": train_vae, "teacher": train_teacher, "classifier": train_classifier}


def train(cfg: StageConfig) -> Path:
    return TRAINERS[cfg.stage](cfg)
