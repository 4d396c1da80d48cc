"""Latent consistency distillation (Luo et al. 2023, Algorithm 1) and its LCM-LoRA variant.

One training step, for a batch of latents z with text c:
  sample w ~ U[w_min, w_max] and t_{n+k} uniformly on the skipping grid; noise z to t_{n+k};
  take one solver step of the augmented PF-ODE back to t_n with the teacher's classifier-free
  guidance (conditional and unconditional rows in one batched forward); the target is the
  EMA student at t_n (no gradient), the prediction the online student at t_{n+k}, both through
  the boundary scalings; the loss is their L2 or Huber distance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lcmserve.consistency import (
    boundary_scalings,
    cfg_batch,
    cfg_combine,
    cfg_split,
    consistency_output,
    guidance_embedding,
    imagen_scale,
    predicted_x0,
    renoise,
    skipping_grid,
)
from lcmserve.distill.solvers import SOLVER_STEPS, GuidedModel
from lcmserve.engine.conditioning import TextConditioning, added_cond_kwargs, cfg_text, sdxl_time_ids
from lcmserve.errors import InvalidInputError
from lcmserve.models.model import NoiseSchedule


@dataclass
class ConsistencyMath:
    """The schedule constants of one run, on the training device."""

    alphas_cumprod: torch.Tensor  # float32 [T]
    prediction_type: str
    skipping_step: int
    timestep_scaling: float
    grid: torch.Tensor  # int64 [T / k], the t_{n+k} of the skipping grid
    vae_scale_factor: int

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule, k: int, vae_scale_factor: int,
                      device: torch.device) -> "ConsistencyMath":
        grid = torch.tensor(skipping_grid(schedule.num_train_timesteps, k), dtype=torch.long, device=device)
        return cls(schedule.alphas_cumprod.to(device, torch.float32), schedule.prediction_type, k,
                   schedule.timestep_scaling, grid, vae_scale_factor)


@dataclass
class StepDraws:
    """Every random draw of one step: t_{n+k} per row, w per row, the forward-diffusion noise."""

    t_start: torch.Tensor
    w: torch.Tensor
    noise: torch.Tensor


def draw_step(math: ConsistencyMath, latents: torch.Tensor, gen: torch.Generator, w_min: float,
              w_max: float) -> StepDraws:
    """n ~ U on the skipping grid, w ~ U[w_min, w_max], noise ~ N(0, I), drawn on the CPU from ``gen``."""
    b = latents.shape[0]
    index = torch.randint(0, len(math.grid), (b,), generator=gen)
    w = w_min + (w_max - w_min) * torch.rand(b, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    device = latents.device
    return StepDraws(math.grid[index.to(math.grid.device)].to(device), w.to(device), noise.to(device))


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, torch.float32)


def _unet_added(text: TextConditioning, x: torch.Tensor, math: ConsistencyMath) -> dict[str, torch.Tensor] | None:
    """SDXL's micro-conditioning at the image size of latents ``x``, as the engine passes it; None for SD."""
    f = math.vae_scale_factor
    return added_cond_kwargs(text, sdxl_time_ids(text.pooled, x.shape[-2] * f, x.shape[-1] * f))


def consistency_fn(unet, x: torch.Tensor, t: torch.Tensor, text: TextConditioning, math: ConsistencyMath,
                   w_embedding: torch.Tensor | None) -> torch.Tensor:
    """f(x, w, c, t) = c_skip(t) x + c_out(t) x0(unet(x, t, w, c)) (Luo et al. 2023, eq. 9), per-row t."""
    out = unet(x, t, encoder_hidden_states=text.hidden, timestep_cond=w_embedding,
               added_cond_kwargs=_unet_added(text, x, math)).sample.float()
    x0 = predicted_x0(out, x, _rows(math.alphas_cumprod[t], x), math.prediction_type)
    c_skip, c_out = boundary_scalings(t.float(), math.timestep_scaling)
    return consistency_output(x, x0, _rows(c_skip, x), _rows(c_out, x))


def guided_teacher(unet, text: TextConditioning, uncond: TextConditioning, w: torch.Tensor,
                   math: ConsistencyMath) -> GuidedModel:
    """The teacher on the augmented PF-ODE: (1 + w) cond - w uncond, both rows in one batched forward."""
    b = text.hidden.shape[0]
    both = cfg_text(text, uncond.expand(b) if uncond.hidden.shape[0] != b else uncond)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(cfg_batch(x, x), cfg_batch(t, t), encoder_hidden_states=both.hidden,
                   added_cond_kwargs=_unet_added(both, x, math)).sample.float()
        cond, unc = cfg_split(out)
        return cfg_combine(cond, unc, _rows(imagen_scale(w), x))

    return model


def distance(pred: torch.Tensor, target: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    """L2, or the pseudo-Huber sqrt(d^2 + c^2) - c of Song & Dhariwal (2023), averaged over all elements."""
    if loss == "l2":
        return F.mse_loss(pred.float(), target.float())
    return (torch.sqrt((pred.float() - target.float()) ** 2 + huber_c**2) - huber_c).mean()


def lcd_loss(student, target, teacher_unet, latents: torch.Tensor, text: TextConditioning, uncond: TextConditioning,
             draws: StepDraws, math: ConsistencyMath, *, solver: str, loss: str, huber_c: float,
             w_embedding_dim: int | None, autocast=None) -> torch.Tensor:
    """One LCD loss. ``target`` None uses the online student without gradient (LCM-LoRA with no EMA)."""
    autocast = autocast or torch.autocast("cpu", enabled=False)
    # 1. t_{n+k} on the skipping grid and t_n = t_{n+k} - k (-1 at the boundary, clamped to 0)
    t_start = draws.t_start
    t_end = (t_start - math.skipping_step).clamp(min=0)
    w_emb = None
    if w_embedding_dim:
        w_emb = guidance_embedding(draws.w, w_embedding_dim).to(latents.device)
    # 2. forward diffusion of z to t_{n+k}
    x_start = renoise(latents, draws.noise, _rows(math.alphas_cumprod[t_start], latents))
    with torch.no_grad():
        # 3. one solver step of the augmented PF-ODE with the teacher's guidance, back to t_n
        with autocast:
            guided = guided_teacher(teacher_unet, text, uncond, draws.w, math)
            x_end = SOLVER_STEPS[solver](guided, x_start, t_start, t_start - math.skipping_step,
                                         math.alphas_cumprod, math.prediction_type)
            # 4. the target: the EMA student at t_n
            target_out = consistency_fn(target if target is not None else student, x_end, t_end, text, math, w_emb)
    # 5. the prediction: the online student at t_{n+k}
    pred = consistency_fn(student, x_start, t_start, text, math, w_emb)
    return distance(pred, target_out, loss, huber_c)


# -- students -------------------------------------------------------------------------------------
def lcd_student(teacher_unet, time_cond_proj_dim: int):
    """The teacher's UNet plus a zero-initialised guidance embedding: at step 0 it predicts what the teacher does."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher_unet.parameters()).device).train().requires_grad_(True)


def lcd_student_from(teacher_unet, folder: str | Path):
    """The student as an earlier LCM of the same architecture left it (to follow a teacher that moved on)."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    folder = folder / "unet" if (folder / "unet").is_dir() else folder
    if not (folder / "config.json").is_file():
        raise InvalidInputError(f"init_student: no UNet in {str(folder)!r} (a pipeline folder with unet/ or a unet "
                                "folder)", param="init_student")
    student = UNet2DConditionModel.from_pretrained(folder, dtype=torch.float32)
    if student.config.get("time_cond_proj_dim") is None:
        raise InvalidInputError(f"init_student: {str(folder)!r} has no guidance embedding; it is not an LCM",
                                param="init_student")
    ours = {k: tuple(v.shape) for k, v in teacher_unet.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in student.state_dict().items() if k != "time_embedding.cond_proj.weight"}
    if ours != theirs:
        raise InvalidInputError(f"init_student: {str(folder)!r} is not of the teacher's architecture", param="init_student")
    return student.to(next(teacher_unet.parameters()).device).train().requires_grad_(True)


def lora_student(teacher_unet, rank: int, alpha: int, targets: list[str], seed: int):
    """A copy of the teacher's UNet with peft LoRA adapters; only the adapters train."""
    from peft import LoraConfig

    student = copy.deepcopy(teacher_unet).requires_grad_(False)
    names = [name for name, _ in student.named_modules()]
    # peft matches a target as a suffix of module names; keep those this architecture has
    kept = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not kept:
        raise InvalidInputError.out_of_range("lora_targets", targets, "module names present in the teacher's UNet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=kept, init_lora_weights="gaussian"))
    return student.train()


def ema_target(student):
    return copy.deepcopy(student).requires_grad_(False).eval()


@torch.no_grad()
def update_ema(target, student, decay: float) -> None:
    """theta^- <- decay theta^- + (1 - decay) theta, over the trained parameters (Luo et al. 2023, Algorithm 1)."""
    target_params = dict(target.named_parameters())
    for name, param in student.named_parameters():
        if param.requires_grad:
            target_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
