"""The distillation loop: accelerate (one CPU, one GPU, or DDP over processes), EMA, checkpoints, resume.

Runs under ``accelerate launch`` or ``torchrun`` as well as alone. Every random draw is a
pure function of (seed, step, rank) (``data.step_generator``), so a run killed and resumed
from its last checkpoint takes the same steps, on the same data, as one that never stopped;
a checkpoint therefore holds only weights, optimizer, learning-rate schedule and step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lcmserve.distill.config import CONFIG_FILE, SUMMARY_FILE, DistillConfig, check_skipping_step
from lcmserve.distill.data import (
    LatentCache,
    MapSource,
    StreamSource,
    TrainData,
    build_or_load_cache,
    first_captions,
    open_source,
    step_generator,
)
from lcmserve.distill.lcd import (
    ConsistencyMath,
    draw_step,
    ema_target,
    lcd_loss,
    lcd_student,
    lcd_student_from,
    lora_student,
    update_ema,
)
from lcmserve.distill.lcf import lcf_loss, rewrite_loss
from lcmserve.distill.teacher import Teacher, TeacherInfo, encode_prompts, inspect_teacher, load_teacher, unconditional
from lcmserve.errors import InvalidInputError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
# Options that change the trajectory of a run: a resumed run must not change them.
_TRAJECTORY = ("mode", "teacher", "data", "resolution", "batch_size", "lr", "lr_warmup_steps", "weight_decay",
               "max_grad_norm", "skipping_step", "solver", "w_min", "w_max", "lora_w", "time_cond_proj_dim",
               "ema_decay", "loss", "huber_c", "seed", "lora_rank", "lora_alpha", "lora_targets", "num_samples",
               "overfit_batches", "init_student", "caption_rewrite")


@dataclass
class Plan:
    """What the checks found: the teacher, the data, the resolution. Built before any weights load."""

    cfg: DistillConfig
    teacher: TeacherInfo
    source: MapSource | StreamSource
    resolution: int


@dataclass
class DistillResult:
    """Where the model went, the step the run started from, every step's loss (mean over processes)."""

    out: Path
    start_step: int
    steps: int
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    unet: torch.nn.Module | None = None  # the final UNet of this process (EMA target where there is one)


def check_inputs(cfg: DistillConfig) -> Plan:
    """Every check that needs the teacher folder or the data, with no weights loaded."""
    info = inspect_teacher(cfg.teacher, cfg.mode)
    check_skipping_step(cfg.skipping_step, info.num_train_timesteps)
    vae_config = json.loads((info.folder / "vae" / "config.json").read_text())
    sample = info.unet_config.get("sample_size", 64)
    native = int(sample[0] if isinstance(sample, (list, tuple)) else sample) * 2 ** (
        len(vae_config["block_out_channels"]) - 1)
    resolution = cfg.resolution or native
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if resolution % vae_factor:
        raise InvalidInputError.out_of_range("resolution", resolution, f"a multiple of {vae_factor} for this VAE")
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise InvalidInputError(
            "mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU", param="mixed_precision")
    source = open_source(cfg.data, cfg.seed, cfg.num_samples)
    if cfg.cache and isinstance(source, StreamSource):
        raise InvalidInputError("cache: needs a finite data set (a folder, shards, or a generator with num_samples)",
                                param="cache")
    return Plan(cfg, info, source, resolution)


# -- checkpoints ------------------------------------------------------------------------------
def _checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def _trained_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def _check_same_run(out: Path, cfg: DistillConfig) -> None:
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file() or not _checkpoints(out):
        return
    saved = json.loads(saved_file.read_text())
    changed = [k for k in _TRAJECTORY if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise InvalidInputError(
            f"out: {str(out)!r} holds checkpoints of a run with other options ({detail}); resume with the same "
            "options or choose a new --out", param="out")


class Checkpointer:
    """Atomic checkpoint files ``checkpoints/step-NNNNNNN.pt``; the newest complete one resumes a run."""

    def __init__(self, out: Path, keep: int, accelerator) -> None:
        self.out, self.keep, self.accelerator = out, keep, accelerator

    def save(self, step: int, student, target, optimizer, lr_schedule, losses: list[float]) -> None:
        acc = self.accelerator
        state = {
            "step": step, "losses": losses, "student": _trained_state(student),
            "target": None if target is None else _trained_state_like(target, student),
            "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
            "scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
        }
        if acc.is_main_process:
            folder = self.out / CHECKPOINTS
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"step-{step:07d}.pt"
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact
            for old in _checkpoints(self.out)[: -self.keep]:
                old.unlink(missing_ok=True)
        acc.wait_for_everyone()

    def load_latest(self, student, target, optimizer, lr_schedule) -> tuple[int, list[float]]:
        found = _checkpoints(self.out)
        if not found:
            return 0, []
        state = torch.load(found[-1], map_location="cpu", weights_only=False)
        _load_params(student, state["student"])
        if target is not None:
            _load_params(target, state["target"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        if state.get("scaler") is not None and getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        logger.info("resuming from %s (step %d)", found[-1], state["step"])
        return int(state["step"]), list(state["losses"])


def _trained_state_like(target, student) -> dict[str, torch.Tensor]:
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    return {n: p.detach().cpu().clone() for n, p in target.named_parameters() if n in names}


@torch.no_grad()
def _load_params(module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise InvalidInputError(f"out: the checkpoint does not fit this model (e.g. {missing[0]})", param="out")
    for name, value in state.items():
        params[name].copy_(value)


# -- samples and export ---------------------------------------------------------------------------
def _engine_view(teacher: Teacher, unet, cfg: DistillConfig, math: ConsistencyMath):
    from dataclasses import replace

    from lcmserve.models.model import NoiseSchedule

    ts = teacher.schedule
    schedule = NoiseSchedule(ts.alphas_cumprod, ts.prediction_type, ts.timestep_scaling,
                             ts.num_train_timesteps // cfg.skipping_step)
    return replace(teacher.model, unet=unet, schedule=schedule,
                   guidance_mode="cfg" if cfg.mode == "lora" else "embedding")


@torch.no_grad()
def write_samples(path: Path, teacher: Teacher, unet, cfg: DistillConfig, math: ConsistencyMath,
                  prompts: list[str], resolution: int) -> Path:
    """A PNG grid (one image per prompt, seeds 0..n-1) and the prompts beside it."""
    from PIL import Image

    from lcmserve.engine import LCMSampler
    from lcmserve.engine.request import Row

    was_training = unet.training
    unet.eval()
    # The engine takes diffusers' guidance scale, the paper's w + 1; an LCM-LoRA has its w built in.
    guidance = 1.0 if cfg.mode == "lora" else 1.0 + (cfg.w_min + cfg.w_max) / 2
    sampler = LCMSampler(_engine_view(teacher, unet, cfg, math), max_batch_size=len(prompts))
    rows = [Row(p, i, guidance) for i, p in enumerate(prompts)]
    images = sampler.run_rows(rows, cfg.sample_steps, resolution, resolution).images
    unet.train(was_training)
    arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    cols = min(len(arrays), 4)
    grid = Image.new("RGB", (resolution * cols, resolution * (-(-len(arrays) // cols))))
    for i, a in enumerate(arrays):
        grid.paste(Image.fromarray(a), ((i % cols) * resolution, (i // cols) * resolution))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    path.with_suffix(".txt").write_text("".join(f"{i}: {p}\n" for i, p in enumerate(prompts)))
    return path


def export_model(out: Path, teacher: Teacher, unet, cfg: DistillConfig) -> Path:
    """lcd/lcf: a diffusers LCM pipeline folder at ``out``; lora and lcf_adapter: the adapter file at ``out``."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionXLPipeline

    pipe = teacher.pipeline
    if cfg.mode == "lora" or cfg.lcf_adapter:
        from peft.utils import get_peft_model_state_dict

        # peft's key format as is: diffusers' loader reads it, while its older "lora.down/up" conversion
        # covers attention layers only and would leave the conv and time-embedding adapters behind.
        layers = get_peft_model_state_dict(unet)
        # The adapter's config (rank, alpha, targets) goes into the file's metadata: without it diffusers'
        # loader assumes alpha = rank, and an adapter trained with another alpha is served at the wrong scale.
        type(pipe).save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True,
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        return out
    # The LCM's inference grid is the skipping grid it was trained on: original_inference_steps = T / k.
    scheduler = LCMScheduler.from_config(
        pipe.scheduler.config, original_inference_steps=teacher.schedule.num_train_timesteps // cfg.skipping_step)
    unet.eval()
    if teacher.info.family == "sdxl":
        lcm = StableDiffusionXLPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=unet, scheduler=scheduler)
    else:
        lcm = LatentConsistencyModelPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    lcm.save_pretrained(str(out), safe_serialization=True)
    return out


# -- the loop -------------------------------------------------------------------------------------
def _reset_accelerate_state() -> None:
    """Let one Python process run several single-process trainings (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


FINISH_RESERVE_S = 15.0  # kept back from max_minutes for the final checkpoint, samples and model


def distill(cfg: DistillConfig, on_step=None) -> DistillResult:
    """Distil (or fine-tune) as ``cfg`` says; resumes from the newest checkpoint in ``cfg.out``."""
    from accelerate import Accelerator

    started = time.perf_counter()
    plan = check_inputs(cfg)  # every bad option fails here, before any weights load
    out = Path(cfg.out).expanduser()
    _check_same_run(out, cfg)
    # cpu=True also where no GPU is visible: accelerate only sets up multi-process CPU (gloo) runs then.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu or not torch.cuda.is_available())
    try:
        return _run(cfg, plan, out, accelerator, started, on_step)
    finally:
        if accelerator.num_processes == 1:
            _reset_accelerate_state()


def _student(cfg: DistillConfig, teacher: Teacher, device: torch.device):
    """The student (online, float32) and its EMA target (None without one)."""
    if cfg.mode == "lcd" and cfg.init_student:
        student = lcd_student_from(teacher.unet, cfg.init_student)
    elif cfg.mode == "lcd":
        student = lcd_student(teacher.unet, cfg.time_cond_proj_dim)
    elif cfg.mode == "lora" or cfg.lcf_adapter:
        student = lora_student(teacher.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    else:
        student = teacher.unet  # LCF: the LCM itself trains; there is no teacher
        student.requires_grad_(True).train()
    target = ema_target(student) if cfg.ema_decay > 0 else None
    if cfg.mode != "lcf" and device.type == "cuda" and cfg.mixed_precision != "no":
        # the frozen teacher UNet runs in the mixed-precision dtype (the student keeps float32 weights)
        teacher.unet.to(torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student, target


def _train_data(cfg: DistillConfig, plan: Plan, teacher: Teacher, accelerator) -> TrainData:
    """Per-step batches of this process, from a cache of encoded latents and text when ``cfg.cache`` names one."""
    cache: LatentCache | None = None
    if cfg.cache:
        cache = build_or_load_cache(cfg.cache, plan.source, teacher, plan.resolution,
                                    is_main=accelerator.is_main_process, wait=accelerator.wait_for_everyone)
    return TrainData(plan.source, teacher, seed=cfg.seed, batch_size=cfg.batch_size, resolution=plan.resolution,
                     rank=accelerator.process_index, world=accelerator.num_processes, cache=cache)


def _deadline_passed(deadline: float | None, accelerator) -> bool:
    """Whether any process is past ``deadline``: all of them stop at the same step."""
    if deadline is None:
        return False
    flag = torch.tensor(float(time.perf_counter() > deadline), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max") > 0) if accelerator.num_processes > 1 else bool(flag > 0)


@dataclass
class _Stepper:
    """Everything one optimizer step touches; calling it runs step ``step`` and returns its loss."""

    cfg: DistillConfig
    accelerator: Any
    data: TrainData
    math: ConsistencyMath
    teacher: Teacher
    uncond: Any
    student: torch.nn.Module
    ddp_student: torch.nn.Module
    target: torch.nn.Module | None
    optimizer: Any
    lr_schedule: Any

    def __post_init__(self) -> None:
        lora = self.cfg.mode == "lora"
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.w_range = (self.cfg.lora_w, self.cfg.lora_w) if lora else (self.cfg.w_min, self.cfg.w_max)
        self.w_dim = None if lora else self.student.config.time_cond_proj_dim
        self.rewrite = None
        if self.cfg.caption_rewrite:
            from lcmserve.models.registry import caption_rewrite

            self.rewrite = caption_rewrite(self.cfg.caption_rewrite)

    def __call__(self, step: int) -> torch.Tensor:
        cfg, acc, math = self.cfg, self.accelerator, self.math
        data_step = step % cfg.overfit_batches if cfg.overfit_batches else step
        batch = self.data.batch(data_step, acc.device)
        gen = step_generator(cfg.seed, data_step, acc.process_index, stream=0)
        draws = draw_step(math, batch.latents, gen, *self.w_range)
        if self.rewrite is not None:
            with torch.no_grad():
                rewritten = encode_prompts(self.teacher, [self.rewrite(c) for c in batch.captions]).to(acc.device)
            # the LCM the adapter sits on is the teacher's UNet, frozen (the student is a copy with the LoRA)
            loss = rewrite_loss(self.ddp_student, self.teacher.unet, batch.latents, batch.text, rewritten, draws,
                                math, loss=cfg.loss, huber_c=cfg.huber_c, w_embedding_dim=self.w_dim,
                                autocast=acc.autocast())
        elif cfg.mode == "lcf":
            loss = lcf_loss(self.ddp_student, self.target, batch.latents, batch.text, draws, math, loss=cfg.loss,
                            huber_c=cfg.huber_c, w_embedding_dim=self.w_dim, autocast=acc.autocast())
        else:
            loss = lcd_loss(self.ddp_student, self.target, self.teacher.unet, batch.latents, batch.text, self.uncond,
                            draws, math, solver=cfg.solver, loss=cfg.loss, huber_c=cfg.huber_c,
                            w_embedding_dim=self.w_dim, autocast=acc.autocast())
        acc.backward(loss)
        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.target is not None:
            update_ema(self.target, self.student, cfg.ema_decay)
        return acc.reduce(loss.detach(), "mean")


def _run(cfg: DistillConfig, plan: Plan, out: Path, accelerator, started: float, on_step) -> DistillResult:
    from diffusers.optimization import get_scheduler

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    # 1. the teacher (float32, frozen)
    teacher = load_teacher(plan.teacher, device)
    vae_factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    math = ConsistencyMath.from_schedule(teacher.schedule, cfg.skipping_step, vae_factor, device)

    # 2. the student and its EMA target, the optimizer, and the newest checkpoint
    student, target = _student(cfg, teacher, device)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Not passed to accelerate.prepare: its wrapper steps the schedule once per process.
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
    ddp_student, optimizer = accelerator.prepare(student, optimizer)
    checkpointer = Checkpointer(out, cfg.checkpoints_keep, accelerator)
    start, losses = checkpointer.load_latest(student, target, optimizer, lr_schedule)

    # 3. data: per-step batches, optionally from a cache of encoded latents and text
    data = _train_data(cfg, plan, teacher, accelerator)
    prompts = (cfg.sample_prompts or first_captions(data, cfg.samples))[: cfg.samples]
    run_step = _Stepper(cfg, accelerator, data, math, teacher, unconditional(teacher).to(device), student,
                        ddp_student, target, optimizer, lr_schedule)
    if accelerator.is_main_process:
        logger.info("distilling %s (%s, %s) into %s: steps %d..%d, %d process(es) x batch %d, resolution %d",
                    cfg.teacher, cfg.mode, cfg.solver, out, start, cfg.steps, world, cfg.batch_size, plan.resolution)

    bar = tqdm(total=cfg.steps, initial=start, desc=f"distill {cfg.mode}", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    deadline = started + cfg.max_minutes * 60 - FINISH_RESERVE_S if cfg.max_minutes else None
    pending: list[torch.Tensor] = []

    def flush() -> None:  # one device-to-host copy every few steps keeps the GPU queue full
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()

    last = cfg.steps
    for step in range(start, cfg.steps):
        # 4. one step: data, draws, loss, update, EMA
        pending.append(run_step(step))
        done = step + 1
        bar.update(1)
        if on_step is not None or done % 10 == 0:
            flush()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4g}")
        stop = _deadline_passed(deadline, accelerator)
        if stop:
            last = done
            logger.warning("max_minutes=%g reached: stopping at step %d of %d", cfg.max_minutes, done, cfg.steps)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            flush()
            checkpointer.save(done, student, target, optimizer, lr_schedule, losses)
        if prompts and cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps and \
                accelerator.is_main_process and not stop:
            write_samples(out / SAMPLES / f"step-{done:07d}.png", teacher,
                          target if target is not None else student, cfg, math, prompts, plan.resolution)
        if on_step is not None:
            on_step(done, losses[-1])
        if stop:
            break
    bar.close()
    flush()

    # 5. the final model (the EMA target where there is one) and a summary of the run
    final = target if target is not None else student
    if accelerator.is_main_process:
        _finish(out, teacher, final, cfg, math, prompts, plan.resolution, start, last, losses, world, device,
                started)
    accelerator.wait_for_everyone()
    return DistillResult(out, start, last, losses, time.perf_counter() - started, final)


def _finish(out: Path, teacher: Teacher, final, cfg: DistillConfig, math: ConsistencyMath, prompts: list[str],
            resolution: int, start: int, last: int, losses: list[float], world: int, device: torch.device,
            started: float) -> None:
    """The last sample grid, the exported model and the run's summary (main process)."""
    if prompts:
        write_samples(out / SAMPLES / f"step-{last:07d}.png", teacher, final, cfg, math, prompts, resolution)
    export_model(out, teacher, final, cfg)
    wall_s = time.perf_counter() - started
    summary = {"mode": cfg.mode, "teacher": cfg.teacher, "steps": last, "steps_asked": cfg.steps,
               "resumed_from": start, "processes": world, "device": str(device), "wall_s": round(wall_s, 2),
               "final_loss_mean_20": sum(losses[-20:]) / max(1, len(losses[-20:])), "losses": losses}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
