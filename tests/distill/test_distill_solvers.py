"""One-step solvers of distillation against diffusers' own scheduler steps (no UNet: a fixed smooth function)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverSinglestepScheduler

from lcmserve.consistency import predicted_x0
from lcmserve.distill.solvers import (
    SOLVER_STEPS,
    ddim_step,
    dpm_solver_2_step,
    dpm_solver_pp_2s_step,
    midpoint_timesteps,
    predicted_eps,
)

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=0)
PAIRS = [(999, 979), (519, 499), (59, 39), (19, -1)]  # (t_{n+k}, t_n) with k = 20, incl. the boundary row


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic nonlinear stand-in for a guided UNet: depends on x and on each row's t."""
    t = t.float().reshape(-1, 1, 1, 1)
    return torch.tanh(0.7 * x + t / 1000.0) - 0.3 * torch.sin(x * (1 + t / 500.0))


def _alphas() -> torch.Tensor:
    return DDIMScheduler(**SCHEDULE).alphas_cumprod.float()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_eps_inverts_predicted_x0(prediction_type):
    ab = torch.tensor(0.37)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    out = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(predicted_eps(out, x_t, ab, prediction_type), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predicted_x0(out, x_t, ab, prediction_type), x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers_ddim_scheduler(prediction_type):
    torch.manual_seed(0)
    alphas = _alphas()
    starts = torch.tensor([s for s, _ in PAIRS])
    x = torch.randn(len(PAIRS), 4, 8, 8)
    ours = ddim_step(fake_model, x, starts, starts - 20, alphas, prediction_type)
    for row, (start, _) in enumerate(PAIRS):
        sched = DDIMScheduler(**SCHEDULE, prediction_type=prediction_type)
        sched.set_timesteps(1000 // 20)  # prev_timestep = t - 20, alpha_bar[0] below 0 (set_alpha_to_one=False)
        out = fake_model(x[row : row + 1], torch.tensor([start]))
        ref = sched.step(out, start, x[row : row + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[row : row + 1], ref, atol=1e-5, rtol=1e-5)


def _diffusers_second_order(algorithm: str, prediction_type: str, x: torch.Tensor, start: int, mid: int, end: int):
    """DPMSolverSinglestepScheduler's own first-order (to the midpoint) and second-order updates."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    sched = DPMSolverSinglestepScheduler(**{k: SCHEDULE[k] for k in keys}, algorithm_type=algorithm, solver_order=2, prediction_type=prediction_type,
                                         lower_order_final=False, final_sigmas_type="sigma_min")
    alphas = sched.alphas_cumprod
    sigma = lambda t: ((1 - alphas[max(t, 0)]) / alphas[max(t, 0)]) ** 0.5  # noqa: E731
    sched.sigmas = torch.stack([sigma(start), sigma(mid), sigma(end)]).float()
    sched._step_index = 0
    m_start = sched.convert_model_output(fake_model(x, torch.tensor([start])), sample=x)
    u = sched.dpm_solver_first_order_update(m_start, sample=x)
    sched._step_index = 1
    m_mid = sched.convert_model_output(fake_model(u, torch.tensor([mid])), sample=u)
    return sched.singlestep_dpm_solver_second_order_update([m_start, m_mid], sample=x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("algorithm,step", [("dpmsolver", dpm_solver_2_step), ("dpmsolver++", dpm_solver_pp_2s_step)])
def test_second_order_matches_diffusers_singlestep(algorithm, step, prediction_type):
    torch.manual_seed(1)
    alphas = _alphas()
    starts = torch.tensor([s for s, _ in PAIRS])
    x = torch.randn(len(PAIRS), 4, 8, 8)
    ours = step(fake_model, x, starts, starts - 20, alphas, prediction_type)
    mids = midpoint_timesteps(starts, starts - 20, alphas)
    for row, (start, end) in enumerate(PAIRS):
        ref = _diffusers_second_order(algorithm, prediction_type, x[row : row + 1], start, int(mids[row]), end)
        torch.testing.assert_close(ours[row : row + 1], ref.float(), atol=1e-4, rtol=1e-4)


def test_midpoints_lie_strictly_inside_and_near_the_log_snr_middle():
    alphas = _alphas()
    starts = torch.tensor([999, 519, 59, 19, 2, 1, 0])
    ends = starts - torch.tensor([20, 20, 20, 20, 2, 1, 1])
    mids = midpoint_timesteps(starts, ends, alphas)
    lam = 0.5 * (alphas.double().log() - (1 - alphas.double()).log())
    for s, e, m in zip(starts.tolist(), ends.tolist(), mids.tolist()):
        e0 = max(e, 0)
        if s - e0 >= 2:
            assert e0 < m < s
            middle = (lam[s] + lam[e0]) / 2
            best = min(range(e0 + 1, s), key=lambda j: abs(lam[j] - middle))
            assert m == best
        else:  # no timestep in between: the solver falls back to first order
            assert m == s


@pytest.mark.parametrize("name", ["dpmsolver", "dpmsolver++"])
def test_second_order_without_room_is_ddim(name):
    alphas = _alphas()
    x = torch.randn(3, 4, 8, 8)
    starts = torch.tensor([1, 5, 0])
    ends = starts - 1
    torch.testing.assert_close(SOLVER_STEPS[name](fake_model, x, starts, ends, alphas, "epsilon"),
                               ddim_step(fake_model, x, starts, ends, alphas, "epsilon"), atol=1e-5, rtol=1e-5)
