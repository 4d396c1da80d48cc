"""Latent consistency fine-tuning (Luo et al. 2023, sec. 4.5 and Algorithm 3): an LCM on new data, no teacher.

Consistency training in latent space: both points of a pair are noised from the same data
latent with the same noise, z_{t_n} = alpha(t_n) z + sigma(t_n) eps and z_{t_{n+k}} likewise,
so they lie on one forward trajectory; the online student at t_{n+k} is pulled towards the
EMA student at t_n.

An adapter on an LCM can instead be distilled from the LCM itself (``rewrite_loss``): where the new
behaviour is "draw for caption c what the LCM draws for caption c'" (a style that is a change of
the scene, such as a shifted palette), the LCM's own consistency function on c' is an exact
target at every noisy input, step and guidance scale. Consistency training has only the data's
images to learn from and pays for the new style with the scenes it draws; this target keeps
them, and needs no consistency pair.
"""

from __future__ import annotations

import torch

from lcmserve.consistency import guidance_embedding, renoise
from lcmserve.distill.lcd import ConsistencyMath, StepDraws, _rows, consistency_fn, distance
from lcmserve.engine.conditioning import TextConditioning


def lcf_loss(student, target, latents: torch.Tensor, text: TextConditioning, draws: StepDraws, math: ConsistencyMath, *,
             loss: str, huber_c: float, w_embedding_dim: int, autocast=None) -> torch.Tensor:
    """One LCF loss with shared noise between t_{n+k} and t_n."""
    autocast = autocast or torch.autocast("cpu", enabled=False)
    # 1. t_{n+k} on the skipping grid, t_n = t_{n+k} - k (clamped to 0 at the boundary)
    t_start = draws.t_start
    t_end = (t_start - math.skipping_step).clamp(min=0)
    w_emb = guidance_embedding(draws.w, w_embedding_dim).to(latents.device)
    # 2. one noise draw, two noise levels: the pair shares its trajectory
    x_start = renoise(latents, draws.noise, _rows(math.alphas_cumprod[t_start], latents))
    x_end = renoise(latents, draws.noise, _rows(math.alphas_cumprod[t_end], latents))
    # 3. the target: the EMA student at t_n, no gradient
    with torch.no_grad(), autocast:
        target_out = consistency_fn(target, x_end, t_end, text, math, w_emb)
    # 4. the prediction: the online student at t_{n+k}
    pred = consistency_fn(student, x_start, t_start, text, math, w_emb)
    return distance(pred, target_out, loss, huber_c)


def rewrite_loss(student, base, latents: torch.Tensor, text: TextConditioning, rewritten: TextConditioning,
                 draws: StepDraws, math: ConsistencyMath, *, loss: str, huber_c: float, w_embedding_dim: int,
                 autocast=None) -> torch.Tensor:
    """The adapted LCM on the captions against the frozen LCM on their rewrites, at one noisy input:
    f_adapted(x_t, w, c, t) -> f_base(x_t, w, rewrite(c), t), t on the skipping grid."""
    autocast = autocast or torch.autocast("cpu", enabled=False)
    t = draws.t_start
    w_emb = guidance_embedding(draws.w, w_embedding_dim).to(latents.device)
    x = renoise(latents, draws.noise, _rows(math.alphas_cumprod[t], latents))
    with torch.no_grad(), autocast:
        target_out = consistency_fn(base, x, t, rewritten, math, w_emb)
    pred = consistency_fn(student, x, t, text, math, w_emb)
    return distance(pred, target_out, loss, huber_c)
