"""The LCM math, once: used by the engine's sampler and by distillation alike.

Notation follows Luo et al. (2023), "Latent Consistency Models": t is a discrete DDPM
timestep in [0, T), alpha_bar(t) the cumulative product of the noise schedule, w the
guidance scale of the augmented PF-ODE. diffusers' ``LCMScheduler`` implements the same
inference math as a stateful object that steps one shared timestep at a time; training needs
a different timestep per row and the CUDA-graph engine needs stateless calls, so the
formulas live here as small pure functions and a test pins them to ``LCMScheduler``.
"""

from __future__ import annotations

import math

import torch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
ORIGINAL_STEPS = 50
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def skipping_grid(num_train_timesteps: int = 1000, k: int = 20) -> list[int]:
    """Ascending timesteps t_n = n k - 1 of the skipping-step schedule (Luo et al. 2023, sec. 4.3)."""
    if k < 1 or num_train_timesteps % k:
        raise ValueError(f"k must divide num_train_timesteps={num_train_timesteps}; got k={k}")
    return [n * k - 1 for n in range(1, num_train_timesteps // k + 1)]


def lcm_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, original_steps: int = ORIGINAL_STEPS
) -> list[int]:
    """Descending inference timesteps: evenly spaced indices into the skip grid (diffusers LCMScheduler)."""
    grid = skipping_grid(num_train_timesteps, num_train_timesteps // original_steps)[::-1]
    if not 1 <= num_steps <= len(grid):
        raise ValueError(f"num_steps must be in [1, {len(grid)}]; got {num_steps}")
    return [grid[math.floor(i * len(grid) / num_steps)] for i in range(num_steps)]


def boundary_scalings(
    t: torch.Tensor | float, timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """c_skip, c_out of Song et al. (2023), eq. 4 as used by LCM, with s = timestep_scaling * t."""
    s = t * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def predicted_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 from an epsilon, v (Salimans & Ho, 2022) or x0 prediction at noise level alpha_bar_t."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar_t).sqrt() * model_output) / alpha_bar_t.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar_t.sqrt() * x_t - (1 - alpha_bar_t).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")


def consistency_output(
    x_t: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor | float, c_out: torch.Tensor | float
) -> torch.Tensor:
    """f_theta(x_t, t) = c_skip(t) x_t + c_out(t) x0 (Luo et al. 2023, eq. 9)."""
    return c_skip * x_t + c_out * x0


def renoise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x0) = N(sqrt(alpha_bar) x0, (1 - alpha_bar) I) (Ho et al. 2020, eq. 4)."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of w * 1000 (Vaswani et al. 2017), the LCM guidance condition."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


# -- classifier-free guidance: the guidance-scale convention and the doubled batch ---------------
# Two conventions meet here. Luo et al. (2023) write the augmented PF-ODE with w: the guided
# prediction is (1 + w) cond - w uncond, and the student embeds that w. diffusers (and every client
# of the engine) speaks Imagen's guidance_scale (Saharia et al. 2022): uncond + s (cond - uncond),
# which is the same prediction at s = w + 1. A request carries s; the embedding and the sampled
# training w are LCM's w. These two functions are the only place the 1 moves.
def imagen_scale(w: torch.Tensor | float) -> torch.Tensor | float:
    """Imagen-style guidance scale s = w + 1 (diffusers' guidance_scale) of LCM's w (Luo et al. 2023, sec. 4.2)."""
    return w + 1


def lcm_w(scale: torch.Tensor | float) -> torch.Tensor | float:
    """LCM's w = s - 1 of an Imagen-style guidance scale s (diffusers' LatentConsistencyModelPipeline)."""
    return scale - 1


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance uncond + s (cond - uncond) (Ho & Salimans 2022) at Imagen-style scale s."""
    return uncond + scale * (cond - uncond)


def cfg_batch(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The doubled batch of classifier-free guidance: one forward for both; unconditional rows first, as diffusers."""
    return torch.cat([uncond, cond])


def cfg_split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond): the two halves of a model output computed on a ``cfg_batch``."""
    uncond, cond = out.chunk(2)
    return cond, uncond
