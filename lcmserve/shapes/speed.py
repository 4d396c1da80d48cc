"""How fast this machine trains the shapes teacher, per batch size and precision: the numbers
that choose `shapes train teacher --batch-size/--bf16/--compile` for a time-boxed GPU run.

Each variant runs the teacher's real training step (``teacher_loss``, AdamW, gradient
clipping, EMA) on synthetic latents and captions, so data loading is left out: it runs in
worker processes during training. The first steps (lazy set-up, torch.compile) are timed
apart from the steady ones.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lcmserve.errors import InvalidInputError

VARIANTS = ("fp32", "bf16", "fp32+compile", "bf16+compile")


@dataclass
class SpeedRow:
    variant: str
    batch_size: int
    steps: int
    first_steps_s: float  # the warm-up steps, compile included
    samples_per_s: float
    peak_mb: float | None  # CUDA max_memory_allocated; None on a CPU

    def samples_in(self, seconds: float) -> float:
        """Samples this variant trains in ``seconds`` of wall time, warm-up included."""
        return max(0.0, seconds - self.first_steps_s) * self.samples_per_s

    def flags(self) -> str:
        return (f"--batch-size {self.batch_size}" + (" --bf16" if "bf16" in self.variant else "")
                + (" --compile" if "compile" in self.variant else ""))


def parse_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise InvalidInputError.out_of_range("variants", text, "a comma list of " + ", ".join(VARIANTS))
    return variants


def teacher_step_speed(variant: str, batch_size: int, device: torch.device, seconds: float = 5.0,
                       warm_steps: int = 5, train_text_encoder: bool = False, snr_gamma: float = 0.0) -> SpeedRow:
    """Time the teacher's training step: ``warm_steps`` first, then as many as fit in ``seconds``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from lcmserve.shapes import models as M
    from lcmserve.shapes.bundle import TEACHER, bundled, clip_text_encoder
    from lcmserve.shapes.train import teacher_loss

    if variant not in VARIANTS:
        raise InvalidInputError.out_of_range("variant", variant, "one of " + ", ".join(VARIANTS))
    teacher = bundled(TEACHER)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet", dtype=torch.float32).to(device).train()
    text_encoder = clip_text_encoder(teacher.parent / "shapes-clip").to(device)
    text_encoder.train(train_text_encoder).requires_grad_(train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=device.type == "cuda")
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75, foreach=device.type == "cuda")
    scheduler = DDPMScheduler.from_config(M.scheduler_config())
    unet_fn = torch.compile(unet) if "compile" in variant else unet
    vocab, length = text_encoder.config.vocab_size, text_encoder.config.max_position_embeddings
    shape = (batch_size, unet.config.in_channels, M.LATENT_SIZE, M.LATENT_SIZE)

    def step() -> None:
        latents, noise = torch.randn(shape, device=device), torch.randn(shape, device=device)
        ids = torch.randint(0, vocab, (batch_size, length), device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device)
        loss = teacher_loss(unet_fn, text_encoder, scheduler, latents, ids, noise, t, bf16="bf16" in variant,
                            train_text_encoder=train_text_encoder, snr_gamma=snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(params)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warm_steps):
        step()
    sync()
    warm_done = time.perf_counter()
    steps = 0
    while steps < 3 or time.perf_counter() - warm_done < seconds:
        step()
        steps += 1
        if steps % 5 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - warm_done
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return SpeedRow(variant, batch_size, steps, warm_done - start, steps * batch_size / elapsed, peak)


def measure(variants: list[str], batch_sizes: list[int], device: torch.device, seconds: float = 5.0, *,
            train_text_encoder: bool = False, snr_gamma: float = 0.0,
            log: Callable[[str], None] = lambda line: None) -> list[SpeedRow]:
    """Time the eager variants at every batch size, then each compiled variant once, at the batch
    size its eager precision ran fastest at (a compile per batch size would cost minutes).
    A variant that fails (out of memory, a compile error) is logged and left out."""
    eager = [v for v in variants if "compile" not in v]
    compiled = [v for v in variants if "compile" in v]
    rows: list[SpeedRow] = []

    def run(variant: str, batch_size: int) -> None:
        try:
            row = teacher_step_speed(variant, batch_size, device, seconds, train_text_encoder=train_text_encoder,
                                     snr_gamma=snr_gamma)
        except Exception as exc:  # out of memory or a compile failure: the other variants still count
            log(f"{variant} at batch {batch_size} failed: {type(exc).__name__}: {str(exc)[:300]}")
            return
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        log(f"{variant} batch {batch_size}: {row.samples_per_s:,.0f} samples/s (first steps {row.first_steps_s:.1f} s)")

    for variant in eager:
        for batch_size in batch_sizes:
            run(variant, batch_size)
    for variant in compiled:
        base = [r for r in rows if r.variant == variant.removesuffix("+compile")]
        run(variant, max(base, key=lambda r: r.samples_per_s).batch_size if base else max(batch_sizes))
    return rows


def markdown(rows: list[SpeedRow], budget_s: float) -> str:
    lines = [f"| variant | batch | steps timed | first steps s | samples/s | samples in {budget_s:g} s | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.variant} | {r.batch_size} | {r.steps} | {r.first_steps_s:.1f} | {r.samples_per_s:,.0f} | "
                     f"{r.samples_in(budget_s):,.0f} | {'-' if r.peak_mb is None else f'{r.peak_mb:,.0f}'} |")
    return "\n".join(lines)
