"""One-step ODE solvers of the (augmented) PF-ODE, from t_{n+k} back to t_n, one timestep per row.

Distillation needs a solver step per training row, each row at its own timestep, over a
guided teacher that is called as ``model(x, t) -> model output`` (epsilon, v or x0, with
classifier-free guidance already folded in). diffusers' schedulers step one shared timestep
of a fixed inference schedule and keep state between calls, so the steps are written here as
small stateless functions; tests/distill/test_distill_solvers.py pins each to diffusers' DDIMScheduler
and DPMSolverSinglestepScheduler.

The end timestep t_n = t_{n+k} - k is -1 for the lowest grid point; like diffusers' LCD
script, it is clamped to 0 (alpha_bar[0], where the boundary scalings give f(x, 0) = x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lcmserve.consistency import predicted_x0, renoise

GuidedModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def predicted_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Epsilon from an epsilon, v (Salimans & Ho 2022, eq. 9 inverted) or x0 prediction at noise level alpha_bar_t."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_bar_t.sqrt() * model_output + (1 - alpha_bar_t).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - alpha_bar_t.sqrt() * model_output) / (1 - alpha_bar_t).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, torch.float32)


def _log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma), the half log-SNR of Lu et al. (2022), eq. 3."""
    return 0.5 * (torch.log(alpha_bar) - torch.log1p(-alpha_bar))


def ddim_step(model: GuidedModel, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor,
              alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Deterministic DDIM step x_{t_{n+k}} -> x_{t_n} (Song et al. 2021, eq. 12 with eta = 0)."""
    ab_s = _per_row(alphas_cumprod[t_start], x)
    ab_t = _per_row(alphas_cumprod[t_end.clamp(min=0)], x)
    out = model(x, t_start).float()
    return renoise(predicted_x0(out, x, ab_s, prediction_type), predicted_eps(out, x, ab_s, prediction_type), ab_t)


def midpoint_timesteps(t_start: torch.Tensor, t_end: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Integer timestep strictly between t_end and t_start nearest the log-SNR midpoint; t_start where none is."""
    lam = _log_snr(alphas_cumprod.double())  # decreasing in t
    lo, hi = t_end.clamp(min=0), t_start
    mid = 0.5 * (lam[lo] + lam[hi])
    # -lambda increases with t: the first t with -lambda >= -mid, or the one before it, is nearest.
    right = torch.searchsorted(-lam, -mid).clamp(max=len(lam) - 1)
    left = (right - 1).clamp(min=0)
    s = torch.where((lam[left] - mid).abs() <= (lam[right] - mid).abs(), left, right)
    s = torch.minimum(torch.maximum(s, lo + 1), hi - 1)
    return torch.where(hi - lo >= 2, s, hi)


def _second_order(model: GuidedModel, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor,
                  alphas_cumprod: torch.Tensor, prediction_type: str, data_prediction: bool) -> torch.Tensor:
    s1 = midpoint_timesteps(t_start, t_end, alphas_cumprod)
    valid = s1 != t_start  # rows with no timestep strictly between the two fall back to first order
    ab_s, ab_1, ab_t = (_per_row(alphas_cumprod[t], x) for t in (t_start, s1, t_end.clamp(min=0)))
    a_s, a_1, a_t = ab_s.sqrt(), ab_1.sqrt(), ab_t.sqrt()
    sig_s, sig_1, sig_t = (1 - ab_s).sqrt(), (1 - ab_1).sqrt(), (1 - ab_t).sqrt()
    lam_s, lam_1, lam_t = _log_snr(ab_s), _log_snr(ab_1), _log_snr(ab_t)
    h = lam_t - lam_s
    r = torch.where(_per_row(valid.float(), x) > 0, (lam_1 - lam_s) / h, torch.ones_like(h))

    out_s = model(x, t_start).float()
    if data_prediction:
        d_s = predicted_x0(out_s, x, ab_s, prediction_type)
        first = (sig_t / sig_s) * x - a_t * torch.expm1(-h) * d_s
        if not bool(valid.any()):
            return first
        u = (sig_1 / sig_s) * x - a_1 * torch.expm1(-r * h) * d_s
        d_1 = predicted_x0(model(u, s1).float(), u, ab_1, prediction_type)
        d = (1 - 1 / (2 * r)) * d_s + (1 / (2 * r)) * d_1
        second = (sig_t / sig_s) * x - a_t * torch.expm1(-h) * d
    else:
        e_s = predicted_eps(out_s, x, ab_s, prediction_type)
        first = (a_t / a_s) * x - sig_t * torch.expm1(h) * e_s
        if not bool(valid.any()):
            return first
        u = (a_1 / a_s) * x - sig_1 * torch.expm1(r * h) * e_s
        e_1 = predicted_eps(model(u, s1).float(), u, ab_1, prediction_type)
        second = first - (sig_t / (2 * r)) * torch.expm1(h) * (e_1 - e_s)
    return torch.where(_per_row(valid.float(), x) > 0, second, first)


def dpm_solver_2_step(model: GuidedModel, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor,
                      alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Single-step DPM-Solver-2 in noise prediction (Lu et al. 2022, Algorithm 4 with r1 at the log-SNR midpoint)."""
    return _second_order(model, x, t_start, t_end, alphas_cumprod, prediction_type, data_prediction=False)


def dpm_solver_pp_2s_step(model: GuidedModel, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor,
                          alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Single-step DPM-Solver++(2S) in data prediction (Lu et al. 2022b, Algorithm 1, r at the log-SNR midpoint)."""
    return _second_order(model, x, t_start, t_end, alphas_cumprod, prediction_type, data_prediction=True)


SOLVER_STEPS = {"ddim": ddim_step, "dpmsolver": dpm_solver_2_step, "dpmsolver++": dpm_solver_pp_2s_step}
TEACHER_CALLS = {"ddim": 1, "dpmsolver": 2, "dpmsolver++": 2}
