"""The LCM math of lcmserve/consistency.py against diffusers' LCMScheduler."""

import pytest
import torch
from diffusers import LCMScheduler, LatentConsistencyModelPipeline

from lcmserve import consistency as C
from lcmserve.engine.loop import lcm_sample
from lcmserve.models.model import NoiseSchedule


@pytest.mark.parametrize("steps", range(1, 9))
def test_timesteps_match_lcm_scheduler(steps):
    scheduler = LCMScheduler()
    scheduler.set_timesteps(steps)
    assert C.lcm_timesteps(steps) == scheduler.timesteps.tolist()


def test_timesteps_for_other_schedule_lengths():
    scheduler = LCMScheduler(num_train_timesteps=500, original_inference_steps=25)
    for steps in (1, 3, 8, 25):
        scheduler.set_timesteps(steps)
        assert C.lcm_timesteps(steps, 500, 25) == scheduler.timesteps.tolist()


def test_skipping_grid_rejects_k_that_does_not_divide():
    assert C.skipping_grid(1000, 20)[:3] == [19, 39, 59]
    assert C.skipping_grid(1000, 20)[-1] == 999
    with pytest.raises(ValueError, match="k must divide"):
        C.skipping_grid(1000, 30)


def test_boundary_scalings_match_scheduler():
    scheduler = LCMScheduler()
    for t in (0, 19, 259, 999):
        ours = C.boundary_scalings(float(t))
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-6, abs=1e-12)
        assert ours[1] == pytest.approx(float(theirs[1]), rel=1e-6)
    # At t=0 the consistency function is the identity (the boundary condition).
    assert C.boundary_scalings(0.0) == (1.0, 0.0)


def test_guidance_embedding_matches_pipeline():
    w = torch.tensor([0.0, 1.5, 7.0, 13.0])
    for dim in (32, 256, 33):
        ours = C.guidance_embedding(w, dim)
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sampling_loop_matches_scheduler_steps(prediction_type, steps):
    """Our loop with a fixed fake model equals LCMScheduler.step driven by the same noise."""
    scheduler = LCMScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    weight = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(99)) * 0.3

    def fake_model(x, t):
        return torch.nn.functional.conv2d(x, weight) * (1 + t / 1000)

    # Both sides draw from generators with the same seed in the same order: x_T, then one
    # re-noise draw per later step (diffusers' scheduler draws inside step()).
    ours_gen = torch.Generator().manual_seed(steps)
    noise = torch.stack([torch.randn(2, 4, 8, 8, generator=ours_gen) for _ in range(steps)])
    outputs = []
    ours = lcm_sample(fake_model, noise, C.lcm_timesteps(steps), schedule, on_step=lambda i, x: outputs.append(x))

    theirs_gen = torch.Generator().manual_seed(steps)
    latents = torch.randn(2, 4, 8, 8, generator=theirs_gen)
    for i, t in enumerate(scheduler.timesteps):
        model_output = fake_model(latents, int(t))
        latents, denoised = scheduler.step(model_output, t, latents, generator=theirs_gen, return_dict=False)
        torch.testing.assert_close(outputs[i], denoised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, denoised, rtol=1e-5, atol=1e-5)


def test_renoise_and_x0_invert_each_other():
    alpha = torch.tensor(0.3)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = C.renoise(x0, eps, alpha)
    torch.testing.assert_close(C.predicted_x0(eps, x_t, alpha, "epsilon"), x0, rtol=1e-5, atol=1e-5)
    v = alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
    torch.testing.assert_close(C.predicted_x0(v, x_t, alpha, "v_prediction"), x0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        C.predicted_x0(eps, x_t, alpha, "flow")
