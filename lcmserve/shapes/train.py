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

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lcmserve.errors import InvalidInputError
from lcmserve.models import resolve_device as _plain_device
from lcmserve.shapes import models as M
from lcmserve.shapes.data import batch_for_step, mix_full_captions, mix_unplaced_captions, scene_targets
from lcmserve.shapes.scenes import BACKGROUNDS

logger = logging.getLogger(__name__)

STAGES = ("clip", "vae", "teacher", "classifier")
_DEFAULTS = {
    "clip": dict(steps=1000, batch_size=128, lr=5e-4),
    "vae": dict(steps=2000, batch_size=16, lr=1e-3),
    "teacher": dict(steps=2000, batch_size=32, lr=3e-4),
    "classifier": dict(steps=1500, batch_size=64, lr=2e-3),
}


def check_snr_gamma(value: float) -> float:
    """``snr_gamma`` as the teacher's loss takes it: a finite number >= 0 (0: plain epsilon MSE)."""
    if not (math.isfinite(value) and value >= 0):
        raise InvalidInputError.out_of_range("snr_gamma", value, "a finite number >= 0 (0: off)")
    return value


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
    clip_dir: str | None = None  # teacher: the trained domain CLIP (text encoder + tokenizer); clip: start from it
    vae_dir: str | None = None  # teacher: the trained VAE; vae: start from this one
    caption_dropout: float = 0.1  # teacher: empty captions, for classifier-free guidance
    ema_decay: float = 0.999  # teacher
    latent_cache: int = 20000  # teacher: scenes pre-encoded by the VAE once (0: render and encode every step)
    init_unet: str | None = None  # teacher: start from this UNet (a diffusers unet folder or a pipeline folder)
    device: str = "auto"  # auto: the CUDA GPU when there is one, else the CPU
    num_workers: int = 0  # teacher: data-loader processes that draw captions, tokens and noise
    max_minutes: float = 0.0  # fit the whole run into this wall time (0: off); see run_loop
    train_text_encoder: bool = False  # teacher: train the text encoder with the UNet (it starts from the CLIP's)
    snr_gamma: float = 0.0  # teacher: Min-SNR loss weighting min(SNR, gamma) / SNR (0: plain epsilon MSE)
    full_captions: float = 0.0  # teacher: share of captions that are full template captions, besides the language's
    unplaced_captions: float = 0.0  # teacher: share of two-object captions that leave out where an object goes
    compile: bool = False  # teacher: torch.compile the UNet (a GPU speed-up; the first steps compile)
    decoder_only: bool = False  # vae: train the decoder alone, so the latent space (and every model on it) stays
    fg_weight: float = 10.0  # vae: weight of object pixels in the reconstruction loss
    ring_weight: float = 1.0  # vae: weight of background pixels within 3 px of an object (where halos and specks sit)
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
        if self.num_workers < 0:
            raise InvalidInputError.out_of_range("num_workers", self.num_workers, "an integer >= 0")
        if not (math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise InvalidInputError.out_of_range("max_minutes", self.max_minutes, "a finite number >= 0 (0: off)")
        resolve_device(self.device)
        if self.init_unet == "shipped":
            from lcmserve.shapes.bundle import resolve_run

            self.init_unet = str(resolve_run("shipped", "teacher"))
        if self.init_unet and not Path(self.init_unet).is_dir():
            raise InvalidInputError(f"init_unet: no such folder {self.init_unet!r}", param="init_unet")
        check_snr_gamma(self.snr_gamma)
        for name in ("full_captions", "unplaced_captions"):
            share = getattr(self, name)
            if not (math.isfinite(share) and 0 <= share <= 1):
                raise InvalidInputError.out_of_range(name, share, "a share in [0, 1]")
        if not 0 < self.ema_decay < 1:
            raise InvalidInputError.out_of_range("ema_decay", self.ema_decay, "in (0, 1)")
        for key in ("fg_weight", "ring_weight"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 1):
                raise InvalidInputError.out_of_range(key, getattr(self, key), "a finite number >= 1")
        if self.stage in ("vae", "clip"):
            self._check_init()
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


    def _check_init(self) -> None:
        """vae and clip: ``vae_dir`` / ``clip_dir`` name the weights to start from (or ``shipped``)."""
        from lcmserve.shapes.bundle import resolve_run

        key = f"{self.stage}_dir"
        if getattr(self, key):
            setattr(self, key, str(resolve_run(getattr(self, key), self.stage)))
            if not Path(getattr(self, key)).is_dir():
                raise InvalidInputError(f"{key}: no such folder {getattr(self, key)!r}", param=key)
        elif self.decoder_only:
            raise InvalidInputError("decoder_only: fine-tuning the decoder needs a trained VAE to start from "
                                    "(--vae RUN or --vae shipped)", param="decoder_only")
        if self.decoder_only and self.stage != "vae":
            raise InvalidInputError("decoder_only: only the vae stage has a decoder", param="decoder_only")


def resolve_device(spec: str) -> torch.device:
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``, with TF32 on for a GPU."""
    device = _plain_device(spec)
    if device.type == "cuda":
        # TF32 matrix units for the float32 recipes: the models are small and the loss noisy.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _autocast(cfg: StageConfig, device: torch.device | None = None):
    return torch.autocast(device.type if device else "cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cosine_lambda(warmup: int, plan: dict):
    """diffusers' cosine-with-warm-up schedule, with a total that ``max_minutes`` may set after the start."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, plan["total"] - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


MEASURE_STEPS = 100  # steps timed before max_minutes fixes the run's length
WARM_STEPS = 10  # steps before the timing starts (lazy initialisation, torch.compile)
FINISH_RESERVE_S = 20.0  # kept back from max_minutes for the final checkpoint and weights


class _Budget:
    """Fits a run into ``cfg.max_minutes`` counted from ``started``: the speed of ``MEASURE_STEPS`` steps
    after ``WARM_STEPS`` untimed ones (lazy set-up, torch.compile) cuts the total to what the budget
    allows (never above ``cfg.steps``), so the cosine schedule still ends at zero; a run that still
    overruns stops at the deadline."""

    def __init__(self, cfg: StageConfig, started: float, start_step: int) -> None:
        self.cfg, self.start_step = cfg, start_step
        self.deadline = started + cfg.max_minutes * 60 - FINISH_RESERVE_S if cfg.max_minutes else None
        self.warm_at = time.monotonic()

    def total_after(self, step: int, total: int) -> int:
        """The run's step count once ``step`` is done."""
        if self.deadline is None:
            return total
        now = time.monotonic()
        if step - self.start_step == WARM_STEPS:
            self.warm_at = now
        elif step - self.start_step == WARM_STEPS + MEASURE_STEPS:
            rate = MEASURE_STEPS / (now - self.warm_at)
            total = max(step, min(total, step + int(rate * (self.deadline - now))))
            logger.info("%s: %.1f steps/s; %d steps fit in max_minutes=%g", self.cfg.stage, rate, total,
                        self.cfg.max_minutes)
        elif now > self.deadline:
            logger.warning("%s: max_minutes reached at step %d of %d", self.cfg.stage, step, total)
            total = step
        return total


def _resume(ckpt: Path, cfg: StageConfig, modules: dict[str, torch.nn.Module], optimizer, schedule,
            extra_state: dict, device: torch.device) -> tuple[int, list[float], int]:
    """(step, losses, total steps) of the checkpoint, its state loaded; a fresh start without one."""
    if not ckpt.exists():
        return 0, [], cfg.steps
    state = torch.load(ckpt, weights_only=False, map_location=device)
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    for name, obj in extra_state.items():
        obj.load_state_dict(state["extra"][name])
    logger.info("resuming %s from step %d", cfg.stage, state["step"])
    return state["step"], state["losses"], min(cfg.steps, state.get("total_steps", cfg.steps))


def run_loop(cfg: StageConfig, modules: dict[str, torch.nn.Module], params, step_fn: Callable[[int], torch.Tensor],
             extra_state: dict | None = None, device: torch.device | None = None,
             started: float | None = None) -> list[float]:
    """The shared loop: AdamW + warm-up/cosine, checkpoints, resume, progress. Returns the losses.

    With ``cfg.max_minutes`` the run fits a wall-time budget (``_Budget``); the total it comes to
    is recorded in the checkpoint and in config.json.
    """
    device = device or torch.device("cpu")
    extra_state = extra_state or {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2, fused=device.type == "cuda")
    plan = {"total": cfg.steps}
    # Our own LambdaLR rather than diffusers' get_cosine_schedule_with_warmup: its total is fixed at creation.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(cfg.warmup_steps, plan))
    ckpt = out / "checkpoint.pt"
    start, losses, plan["total"] = _resume(ckpt, cfg, modules, optimizer, schedule, extra_state, device)
    pending: list[torch.Tensor] = []

    def flush() -> None:  # one device-to-host copy per few steps, not one per step
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()

    def save(step: int) -> None:
        flush()
        _save_atomic({
            "step": step, "total_steps": plan["total"], "losses": losses, "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "modules": {n: m.state_dict() for n, m in modules.items()},
            "extra": {n: o.state_dict() for n, o in extra_state.items()},
        }, ckpt)

    budget = _Budget(cfg, time.monotonic() if started is None else started, start)
    bar = tqdm(total=plan["total"], initial=start, desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True)
    loop_started = time.monotonic()
    step = start
    while step < plan["total"]:
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        for obj in extra_state.values():
            if hasattr(obj, "step"):
                obj.step(params)
        pending.append(loss.detach())
        step += 1
        bar.update(1)
        if step % 10 == 0:
            flush()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        plan["total"] = bar.total = budget.total_after(step, plan["total"])
        if step % cfg.checkpoint_every == 0 or step >= plan["total"]:
            save(step)
    bar.close()
    flush()
    if plan["total"] != cfg.steps:  # the recorded recipe is the run that happened
        cfg.steps = plan["total"]
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    logger.info("%s: %d steps in %.0f s", cfg.stage, step - start, time.monotonic() - loop_started)
    return losses


# -- stage 1: the domain CLIP --------------------------------------------------------------
def train_clip(cfg: StageConfig, device: torch.device, started: float) -> Path:
    from transformers import CLIPModel, CLIPTokenizer

    from lcmserve.shapes.bundle import model_dir

    out = Path(cfg.out)
    tokenizer = M.write_tokenizer(out / "tokenizer")
    torch.manual_seed(cfg.seed)
    if cfg.clip_dir:
        # Continuing a trained CLIP moves it onto today's vocabulary and trains its text tower alone: the image
        # tower gives the FID features, which stay comparable with every result measured before.
        model = CLIPModel.from_pretrained(model_dir(cfg.clip_dir), dtype=torch.float32)
        M.retokenize(model, CLIPTokenizer.from_pretrained(model_dir(cfg.clip_dir, "tokenizer")), tokenizer)
        model.vision_model.requires_grad_(False)
        model.visual_projection.requires_grad_(False)
    else:
        model = CLIPModel(M.clip_config(tokenizer))
    model = model.to(device).train()

    def step_fn(step: int) -> torch.Tensor:
        _, captions, images = batch_for_step(cfg.seed, "clip", step, cfg.batch_size)
        ids = tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        with _autocast(cfg, device):
            return model(input_ids=ids.to(device), pixel_values=(images * 2 - 1).to(device),
                         return_loss=True).loss.float()

    params = [p for p in model.parameters() if p.requires_grad]
    run_loop(cfg, {"clip": model}, params, step_fn, device=device, started=started)
    model.eval().save_pretrained(out / "model")
    return out


# -- stage 2: the VAE ------------------------------------------------------------------------
def train_vae(cfg: StageConfig, device: torch.device, started: float) -> Path:
    from diffusers import AutoencoderKL

    from lcmserve.shapes.bundle import model_dir

    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    if cfg.vae_dir:
        vae = AutoencoderKL.from_pretrained(model_dir(cfg.vae_dir), dtype=torch.float32)
    else:
        vae = AutoencoderKL(**M.vae_config())
    vae = vae.to(device).train()
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False).eval()
        vae.quant_conv.requires_grad_(False)
    kl_weight = float(cfg.extra.get("kl_weight", 1e-6))
    # Objects cover 2-10% of the pixels: unweighted, the loss is all background and the VAE
    # learns to drop small objects and wash out colours. Object pixels weigh fg_weight times more.

    def step_fn(step: int) -> torch.Tensor:
        scenes, _, images = batch_for_step(cfg.seed, "vae", step, cfg.batch_size)
        x = images * 2 - 1
        background = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32) / 255
        mask = ((images - background[:, :, None, None]).abs().sum(1, keepdim=True) > 0.1).float()
        ring = F.max_pool2d(mask, 7, stride=1, padding=3) - mask
        weight = 1 + (cfg.fg_weight - 1) * mask + (cfg.ring_weight - 1) * ring
        x, weight = x.to(device), weight.to(device)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with _autocast(cfg, device), torch.set_grad_enabled(not cfg.decoder_only):
            posterior = vae.encode(x).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
            z = posterior.mean + posterior.std * eps
        with _autocast(cfg, device):
            recon = vae.decode(z).sample.float()
        err = recon - x
        rec = ((err.abs() + err**2) * weight).sum() / (weight.sum() * 3)
        return rec if cfg.decoder_only else rec + kl_weight * posterior.kl().mean().float()

    params = [p for p in vae.parameters() if p.requires_grad]
    run_loop(cfg, {"vae": vae}, params, step_fn, device=device, started=started)
    vae.eval()
    if not cfg.decoder_only:  # a new encoder: scale its latents to unit variance, as Rombach et al. (2022) do
        with torch.no_grad():
            _, _, images = batch_for_step(cfg.seed, "vae-scale", 0, 512)
            latents = vae.encode((images * 2 - 1).to(device)).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "model")
    return out


# -- stage 3: the teacher -------------------------------------------------------------------
def _scenes_chunk(job: tuple[int, int, int, bool]):
    """Scenes ``start..end`` of the train split, and their renders as uint8 arrays (a pool worker)."""
    from lcmserve.shapes.scenes import render, scene_for_index

    seed, start, end, with_images = job
    scenes = [scene_for_index(i, "train", seed) for i in range(start, end)]
    images = np.stack([np.asarray(render(sc), dtype=np.uint8) for sc in scenes]) if with_images else None
    return scenes, images


def training_scenes(seed: int, n: int, workers: int = 0, with_images: bool = False, chunk: int = 2048):
    """Scenes 0..n-1 of the train split (and their renders), in ``workers`` processes when > 0."""
    jobs = [(seed, a, min(n, a + chunk), with_images) for a in range(0, n, chunk)]
    if workers > 0 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = list(tqdm(pool.imap(_scenes_chunk, jobs), total=len(jobs), desc="render scenes", unit="chunk",
                              dynamic_ncols=True))
    else:
        parts = [_scenes_chunk(job) for job in jobs]
    scenes = [sc for part, _ in parts for sc in part]
    return scenes, [im for _, im in parts] if with_images else None


def build_latent_cache(vae, seed: int, n: int, path: Path, batch_size: int = 256, workers: int = 0) -> dict:
    """Render and VAE-encode ``n`` training scenes once (the encoder costs as much as a UNet step).

    Scenes are ``scene_for_index(i, "train", seed)``; the posterior's mean and std are kept so
    every step still samples a fresh latent, and captions are still drawn afresh every step.
    The file is keyed by the VAE's weights, the seed and ``n``: another VAE rebuilds it.
    Mean and std are returned on the VAE's device.
    """
    from lcmserve.engine.cache import fingerprint_module

    key = f"{fingerprint_module(vae)}:{seed}:{n}"
    device = next(vae.parameters()).device
    if path.exists():
        cache = torch.load(path, weights_only=False)
        if cache.get("key") == key:
            return {**cache, "mean": cache["mean"].to(device), "std": cache["std"].to(device)}
        logger.warning("latent cache %s was built for another VAE or size; rebuilding", path)
    _, chunks = training_scenes(seed, n, workers, with_images=True)
    images = torch.from_numpy(np.concatenate(chunks))  # uint8 [n, H, W, 3]
    means, stds = [], []
    with torch.no_grad():
        for a in tqdm(range(0, n, batch_size), desc="encode scenes", unit="batch", dynamic_ncols=True):
            x = images[a : a + batch_size].to(device).permute(0, 3, 1, 2).float() / 255.0
            dist = vae.encode(x * 2 - 1).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    cache = {"key": key, "mean": torch.cat(means), "std": torch.cat(stds)}
    _save_atomic(cache, path)
    return {**cache, "mean": cache["mean"].to(device), "std": cache["std"].to(device)}


class TeacherSteps(torch.utils.data.Dataset):
    """What the teacher's step ``i`` draws, a pure function of (seed, i): runs in data-loader workers.

    Per row: a scene (an index into the latent cache, or a rendered image), a fresh caption of
    it (empty with probability ``caption_dropout``) as token ids, the posterior's noise, the
    diffusion noise and the timestep. The GPU (or the main process) only does the networks.
    """

    def __init__(self, cfg: StageConfig, tokenizer, latent_shape: tuple[int, ...], num_train_timesteps: int,
                 scenes=None) -> None:
        self.cfg, self.tokenizer, self.latent_shape = cfg, tokenizer, latent_shape
        self.num_train_timesteps, self.scenes = num_train_timesteps, scenes

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        import random

        from lcmserve.shapes.language import describe

        cfg, b = self.cfg, self.cfg.batch_size
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        item: dict[str, torch.Tensor] = {}
        if self.scenes is None:
            scenes, captions, images = batch_for_step(cfg.seed, "teacher", step, b)
            item["images"] = images
        else:
            rng = random.Random(f"{cfg.seed}:teacher:{step}")
            idx = [rng.randrange(len(self.scenes)) for _ in range(b)]
            scenes = [self.scenes[i] for i in idx]
            captions = [describe(scene, rng)[0] for scene in scenes]
            item["idx"] = torch.tensor(idx)
        if cfg.full_captions > 0:
            captions = mix_full_captions(scenes, captions, cfg.full_captions,
                                         random.Random(f"{cfg.seed}:teacher-full:{step}"))
        if cfg.unplaced_captions > 0:
            captions = mix_unplaced_captions(scenes, captions, cfg.unplaced_captions,
                                             random.Random(f"{cfg.seed}:teacher-unplaced:{step}"))
        item["eps"] = torch.randn((b, *self.latent_shape), generator=gen)
        # caption dropout: the unconditional model for classifier-free guidance
        drop = torch.rand(b, generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        item["ids"] = self.tokenizer(captions, padding="max_length", max_length=M.MAX_TOKENS, truncation=True,
                                     return_tensors="pt").input_ids
        item["noise"] = torch.randn((b, *self.latent_shape), generator=gen)
        item["t"] = torch.randint(0, self.num_train_timesteps, (b,), generator=gen)
        return item


def _one_thread_worker(_: int) -> None:
    # Eight workers with torch's default thread count each would oversubscribe the CPU.
    torch.set_num_threads(1)


class _StepStream:
    """Items of ``dataset`` in step order from ``first`` on, prefetched by worker processes."""

    def __init__(self, dataset, num_workers: int, pin: bool) -> None:
        self.dataset, self.num_workers, self.pin = dataset, num_workers, pin
        self._it, self._next = None, -1

    def get(self, step: int):
        if self.num_workers == 0:
            return self.dataset[step]
        if self._it is None or step != self._next:
            from torch.utils.data import DataLoader

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize on their own
            loader = DataLoader(self.dataset, batch_size=None, sampler=range(step, len(self.dataset)),
                                num_workers=self.num_workers, pin_memory=self.pin, prefetch_factor=4,
                                worker_init_fn=_one_thread_worker)
            self._it = iter(loader)
        self._next = step + 1
        return next(self._it)


def train_teacher(cfg: StageConfig, device: torch.device, started: float) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from lcmserve.shapes.bundle import model_dir

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text_encoder, tokenizer = teacher_text_encoder(cfg, out / "tokenizer")
    text_encoder = text_encoder.to(device)
    text_encoder.train(cfg.train_text_encoder).requires_grad_(cfg.train_text_encoder)
    vae_dir = model_dir(cfg.vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).to(device).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(M.scheduler_config())
    torch.manual_seed(cfg.seed)
    if cfg.init_unet:
        init = Path(cfg.init_unet)
        init = init / "unet" if (init / "unet").is_dir() else init
        unet = UNet2DConditionModel.from_pretrained(init, dtype=torch.float32)
    else:
        unet = UNet2DConditionModel(**M.unet_config())
    unet = unet.to(device).train()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=0.75, foreach=device.type == "cuda")
    cache, scenes = None, None
    if cfg.latent_cache:
        cache = build_latent_cache(vae, cfg.seed, cfg.latent_cache, out / "latent-cache.pt",
                                   workers=cfg.num_workers)
        scenes, _ = training_scenes(cfg.seed, cfg.latent_cache, cfg.num_workers)
    latent_shape = (vae.config.latent_channels, M.LATENT_SIZE, M.LATENT_SIZE)
    stream = _StepStream(
        TeacherSteps(cfg, tokenizer, latent_shape, noise_scheduler.config.num_train_timesteps, scenes),
        cfg.num_workers, pin=device.type == "cuda",
    )

    unet_fn = torch.compile(unet) if cfg.compile else unet

    def step_fn(step: int) -> torch.Tensor:
        item = {k: v.to(device, non_blocking=True) for k, v in stream.get(step).items()}
        with torch.no_grad():
            if cache is None:
                posterior = vae.encode(item["images"] * 2 - 1).latent_dist
                mean, std = posterior.mean, posterior.std
            else:
                mean, std = cache["mean"][item["idx"]], cache["std"][item["idx"]]
            latents = (mean + std * item["eps"]) * vae.config.scaling_factor
        return teacher_loss(unet_fn, text_encoder, noise_scheduler, latents, item["ids"], item["noise"], item["t"],
                            bf16=cfg.bf16, train_text_encoder=cfg.train_text_encoder, snr_gamma=cfg.snr_gamma)

    modules = {"unet": unet, **({"text_encoder": text_encoder} if cfg.train_text_encoder else {})}
    run_loop(cfg, modules, params, step_fn, extra_state={"ema": ema}, device=device, started=started)
    ema.copy_to(params)
    unet.eval().save_pretrained(out / "unet")
    text_encoder.eval().save_pretrained(out / "text_encoder")  # the one the UNet learnt with, trained or not
    return out


def teacher_loss(unet, text_encoder, noise_scheduler, latents: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor,
                 t: torch.Tensor, *, bf16: bool = False, train_text_encoder: bool = False,
                 snr_gamma: float = 0.0) -> torch.Tensor:
    """The teacher's denoising loss on one batch: epsilon MSE at uniform timesteps, Min-SNR weighted if asked."""
    from diffusers.training_utils import compute_snr

    with torch.set_grad_enabled(train_text_encoder):
        states = text_encoder(ids)[0]
    noisy = noise_scheduler.add_noise(latents, noise, t)  # forward diffusion to timestep t
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = unet(noisy, t, encoder_hidden_states=states).sample.float()
    if not snr_gamma:
        return F.mse_loss(pred, noise)
    # Min-SNR-gamma (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon prediction, so the many
    # easy low-noise steps stop dominating the gradient
    snr = compute_snr(noise_scheduler, t)
    per_row = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_row * snr.clamp(max=snr_gamma) / snr).mean()


def teacher_text_encoder(cfg: StageConfig, tokenizer_dir: Path):
    """The text encoder the teacher learns with, on the tokenizer of today's caption language.

    It is the pipeline's own when continuing a teacher pipeline (``init_unet`` is a pipeline folder
    with a text_encoder/), else the domain CLIP's text tower. Frozen, a contrastive CLIP text tower
    blurs which attribute belongs to which object (docs/shapes.md); ``train_text_encoder`` trains it
    with the UNet. One trained on an older vocabulary carries its embeddings over token by token.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    from lcmserve.shapes.bundle import clip_text_encoder, model_dir

    tokenizer = M.write_tokenizer(tokenizer_dir)
    if cfg.init_unet and (Path(cfg.init_unet) / "text_encoder" / "config.json").is_file():
        text_encoder = CLIPTextModel.from_pretrained(Path(cfg.init_unet) / "text_encoder", dtype=torch.float32)
        old = CLIPTokenizer.from_pretrained(Path(cfg.init_unet) / "tokenizer")
    else:
        text_encoder = clip_text_encoder(cfg.clip_dir)
        old = CLIPTokenizer.from_pretrained(model_dir(cfg.clip_dir, "tokenizer"))
    M.retokenize(text_encoder, old, tokenizer)
    return text_encoder, tokenizer


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


def train_classifier(cfg: StageConfig, device: torch.device, started: float) -> Path:
    from safetensors.torch import save_file

    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    model = M.SceneClassifier().to(device).train()

    def step_fn(step: int) -> torch.Tensor:
        scenes, _, images = batch_for_step(cfg.seed, "classifier", step, cfg.batch_size, ("train", "heldout"))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with _autocast(cfg, device):
            logits = model(augment(images, gen).to(device))
        targets = {k: v.to(device) for k, v in scene_targets(scenes).items()}
        return classifier_loss({k: v.float() for k, v in logits.items()}, targets)

    run_loop(cfg, {"classifier": model}, list(model.parameters()), step_fn, device=device, started=started)
    save_file({k: v.cpu() for k, v in model.eval().state_dict().items()}, out / "classifier.safetensors")
    return out


TRAINERS = {"clip": train_clip, "vae": train_vae, "teacher": train_teacher, "classifier": train_classifier}


def train(cfg: StageConfig) -> Path:
    started = time.monotonic()
    return TRAINERS[cfg.stage](cfg, resolve_device(cfg.device), started)
