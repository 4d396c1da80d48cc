"""The multistep LCM sampling loop, shared by every backend that runs the UNet from Python."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lcmserve.consistency import boundary_scalings, consistency_output, predicted_x0, renoise
from lcmserve.models.model import NoiseSchedule

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]


def lcm_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Luo et al. 2023, Algorithm 3).

    ``noise[0]`` is the initial latent x_T, ``noise[i]`` the fresh noise that re-noises the
    i-th estimate of x0 to timestep ``timesteps[i]``; all of it is drawn by the caller, so the
    loop has no randomness of its own and the same rows give the same images in any batch.
    The step math runs in float32 whatever the UNet's dtype: it costs nothing and keeps bf16
    and fp16 rounding from accumulating across steps.
    """
    if noise.shape[0] != len(timesteps):
        raise ValueError(f"noise has {noise.shape[0]} slices for {len(timesteps)} steps")
    alphas = schedule.alphas_cumprod.to(noise.device)
    latents = noise[0].float()
    denoised = latents
    for i, t in enumerate(timesteps):
        # 1. the model's prediction at (x_t, t), guidance already folded in by the denoiser
        model_output = denoiser(latents, t).float()
        # 2. its estimate of x0, then the consistency function's boundary parameterisation
        x0 = predicted_x0(model_output, latents, alphas[t], schedule.prediction_type)
        c_skip, c_out = boundary_scalings(float(t), schedule.timestep_scaling)
        denoised = consistency_output(latents, x0, c_skip, c_out)
        if on_step is not None:
            on_step(i, denoised)
        # 3. re-noise to the next timestep of the schedule (none after the last step)
        if i + 1 < len(timesteps):
            latents = renoise(denoised, noise[i + 1].float(), alphas[timesteps[i + 1]])
    return denoised
