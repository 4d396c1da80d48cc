"""Distillation on tiny random-weight teachers: the loss by hand, config checks, LCD / LoRA / LCF runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler

from lcmserve.distill import DistillConfig, check_inputs, distill
from lcmserve.distill.lcd import (
    ConsistencyMath,
    StepDraws,
    draw_step,
    lcd_loss,
    lcd_student,
)
from lcmserve.distill.lcf import lcf_loss
from lcmserve.engine.conditioning import TextConditioning
from lcmserve.errors import InvalidInputError, ModelLoadError
from lcmserve.models import load_model
from lcmserve.models.model import NoiseSchedule
from lcmserve.models.presets import build_preset_pipeline

K = 20


def write_scenes(folder, n: int, seed: int = 0, with_captions: bool = True):
    from lcmserve.shapes.scenes import caption_for_index, render

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene, text = caption_for_index(i, "train", seed)
        render(scene).save(folder / f"{i:03d}.png")
        if with_captions:
            (folder / f"{i:03d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), 4)


def small(tmp_path, **overrides) -> DistillConfig:
    base = dict(teacher="", out=str(tmp_path / "run"), data="shapes", steps=2, batch_size=2, resolution=16,
                time_cond_proj_dim=32, samples=0, checkpoint_every=100, lora_rank=4, lora_alpha=4)
    return DistillConfig(**{**base, **overrides})


# -- the loss, by hand ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    pipe = build_preset_pipeline("tiny-sd", lcm=False, seed=7)
    teacher = pipe.unet.eval().requires_grad_(False)
    student = lcd_student(teacher, 32)
    with torch.no_grad():  # move the student and its target off the teacher so every term matters
        torch.manual_seed(3)
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    target = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    schedule = NoiseSchedule.from_scheduler_config(dict(pipe.scheduler.config))
    math = ConsistencyMath.from_schedule(schedule, K, 2, torch.device("cpu"))
    torch.manual_seed(11)
    inputs = dict(
        latents=torch.randn(3, 4, 8, 8), text=TextConditioning(torch.randn(3, 77, 32)),
        uncond=TextConditioning(torch.randn(1, 77, 32)),
        draws=StepDraws(torch.tensor([999, 519, 19]), torch.tensor([2.0, 7.5, 14.0]), torch.randn(3, 4, 8, 8)),
    )
    return teacher, student, target, math, inputs, dict(pipe.scheduler.config)


def _by_hand(teacher, student, target, inputs, scheduler_config, loss, lcf=False):
    """Algorithm 1 (or 3) written out with diffusers' own pieces, one teacher pass per condition."""
    ab = DDPMScheduler.from_config(scheduler_config).alphas_cumprod
    lcm = LCMScheduler.from_config(scheduler_config)
    z, text, uncond, d = inputs["latents"], inputs["text"].hidden, inputs["uncond"].hidden, inputs["draws"]
    rows = []
    for i in range(z.shape[0]):
        s, e = int(d.t_start[i]), max(int(d.t_start[i]) - K, 0)
        w, n, c = float(d.w[i]), d.noise[i : i + 1], text[i : i + 1]
        emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, torch.tensor([w]), embedding_dim=32)
        x_s = ab[s].sqrt() * z[i : i + 1] + (1 - ab[s]).sqrt() * n
        with torch.no_grad():
            if lcf:
                x_e = ab[e].sqrt() * z[i : i + 1] + (1 - ab[e]).sqrt() * n
            else:
                eps_c = teacher(x_s, s, encoder_hidden_states=c).sample
                eps_u = teacher(x_s, s, encoder_hidden_states=uncond).sample
                eps = eps_c + w * (eps_c - eps_u)  # the augmented PF-ODE of the paper, eq. 11
                x0 = (x_s - (1 - ab[s]).sqrt() * eps) / ab[s].sqrt()
                x_e = ab[e].sqrt() * x0 + (1 - ab[e]).sqrt() * eps  # DDIM to t_n
            out_t = target(x_e, e, encoder_hidden_states=c, timestep_cond=emb).sample
            skip_e, cout_e = lcm.get_scalings_for_boundary_condition_discrete(e)
            goal = skip_e * x_e + cout_e * (x_e - (1 - ab[e]).sqrt() * out_t) / ab[e].sqrt()
        out_s = student(x_s, s, encoder_hidden_states=c, timestep_cond=emb).sample
        skip_s, cout_s = lcm.get_scalings_for_boundary_condition_discrete(s)
        pred = skip_s * x_s + cout_s * (x_s - (1 - ab[s]).sqrt() * out_s) / ab[s].sqrt()
        diff = pred - goal
        rows.append(diff**2 if loss == "l2" else torch.sqrt(diff**2 + 1e-3**2) - 1e-3)
    return torch.cat(rows).mean()


@pytest.mark.parametrize("loss", ["l2", "huber"])
def test_lcd_loss_equals_algorithm_1_by_hand(tiny, loss):
    teacher, student, target, math, inputs, sched = tiny
    ours = lcd_loss(student, target, teacher, inputs["latents"], inputs["text"], inputs["uncond"], inputs["draws"],
                    math, solver="ddim", loss=loss, huber_c=1e-3, w_embedding_dim=32)
    ref = _by_hand(teacher, student, target, inputs, sched, loss)
    assert ours.item() > 1e-6
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    ours.backward()
    assert student.time_embedding.cond_proj.weight.grad is not None
    assert all(p.grad is None for p in target.parameters()) and all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_lcf_loss_equals_shared_noise_consistency_training_by_hand(tiny):
    teacher, student, target, math, inputs, sched = tiny
    ours = lcf_loss(student, target, inputs["latents"], inputs["text"], inputs["draws"], math, loss="l2",
                    huber_c=1e-3, w_embedding_dim=32)
    torch.testing.assert_close(ours, _by_hand(teacher, student, target, inputs, sched, "l2", lcf=True),
                               rtol=1e-4, atol=1e-7)


def test_student_starts_as_the_teacher_with_a_zero_guidance_embedding(tiny):
    teacher = tiny[0]
    student = lcd_student(teacher, 256)
    assert student.config.time_cond_proj_dim == 256
    assert not student.time_embedding.cond_proj.weight.any()
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([3.0, 9.0]), 256)
    with torch.no_grad():
        torch.testing.assert_close(student(x, 500, c, timestep_cond=emb).sample, teacher(x, 500, c).sample)


def test_draws_cover_the_skipping_grid_and_the_w_range(tiny):
    math = tiny[3]
    draws = draw_step(math, torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(0), 2.0, 14.0)
    assert set(draws.t_start.tolist()) == set(range(K - 1, 1000, K))
    assert 2.0 <= float(draws.w.min()) < 2.1 and 13.9 < float(draws.w.max()) <= 14.0


# -- configuration errors before training -------------------------------------------------------
@pytest.mark.parametrize("overrides,param", [
    (dict(w_min=5.0, w_max=2.0), "w_min"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(loss="l1"), "loss"),
    (dict(huber_c=0.0), "huber_c"),
    (dict(solver="euler"), "solver"),
    (dict(mode="distil"), "mode"),
    (dict(steps=0), "steps"),
    (dict(resolution=30), "resolution"),
    (dict(cache="c.pt"), "num_samples"),
])
def test_bad_values_fail_at_construction(tmp_path, base_sd_dir, overrides, param):
    with pytest.raises(InvalidInputError) as err:
        small(tmp_path, teacher=str(base_sd_dir), **overrides)
    assert err.value.param == param and param in str(err.value)


def test_bad_inputs_fail_before_any_training(tmp_path, base_sd_dir, lcm_sd_dir, scenes):
    def fails(param, text, **overrides):
        cfg = small(tmp_path, **{"teacher": str(base_sd_dir), **overrides})
        with pytest.raises(InvalidInputError) as err:
            distill(cfg)
        assert err.value.param == param and text in str(err.value), str(err.value)
        assert not (tmp_path / "run").exists()  # nothing was started

    fails("skipping_step", "skipping_step must divide", skipping_step=7)
    (tmp_path / "empty").mkdir()
    fails("data", "has no images", data=str(tmp_path / "empty"))
    partial = write_scenes(tmp_path / "partial", 3)
    (partial / "001.txt").unlink()
    fails("data", "1 of 3 images", data=str(partial))
    fails("data", "does not exist", data=str(tmp_path / "nowhere.tar"))
    (tmp_path / "not-diffusers").mkdir()
    (tmp_path / "not-diffusers" / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        distill(small(tmp_path, teacher=str(tmp_path / "not-diffusers")))
    fails("teacher", "already an LCM", teacher=str(lcm_sd_dir))
    fails("teacher", "no guidance embedding", mode="lcf")
    fails("mixed_precision", "fp16 needs a CUDA GPU", mixed_precision="fp16", cpu=True)
    assert check_inputs(small(tmp_path, teacher=str(base_sd_dir), data=str(scenes), resolution=0)).resolution == 64


# -- runs ---------------------------------------------------------------------------------------
def test_lcd_cli_run_lowers_the_loss_and_writes_a_servable_lcm(tmp_path, base_sd_dir, scenes):
    from lcmserve.cli import main

    out = tmp_path / "lcm"
    # one fixed batch (data and draws) repeated: the loss must fall on it
    rc = main(["distill", "lcd", "--teacher", str(base_sd_dir), "--out", str(out), "--data", str(scenes),
               "--steps", "6", "--batch-size", "2", "--resolution", "16", "--lr", "1e-4", "--ema-decay", "0.5",
               "--time-cond-proj-dim", "32", "--samples", "2", "--checkpoint-every", "3", "--overfit-batches", "1"])
    assert rc == 0
    losses = json.loads((out / "distill.json").read_text())["losses"]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    assert (out / "samples" / "step-0000006.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003.pt", "step-0000006.pt"]

    # 1. diffusers' own LCM pipeline loads and runs it
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.unet.config.time_cond_proj_dim == 32
    assert pipe.scheduler.config.original_inference_steps == 1000 // K
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()

    # 2. our engine loads and serves it
    model = load_model(str(out), device="cpu")
    assert model.guidance_mode == "embedding"
    gen_dir = tmp_path / "gen"
    assert main(["generate", "a red circle", "--model", str(out), "--steps", "2", "--width", "16", "--height", "16",
                 "--seed", "1", "-o", str(gen_dir), "-q"]) == 0
    assert (gen_dir / "000-seed1.png").is_file()


def test_lora_mode_saves_an_adapter_the_engine_fuses(tmp_path, base_sd_dir, scenes):
    # alpha != rank: the adapter's scale alpha / rank must travel with the file
    cfg = small(tmp_path, mode="lora", teacher=str(base_sd_dir), data=str(scenes), lr=1e-2, ema_decay=0.0,
                solver="dpmsolver++", lora_alpha=8)
    result = distill(cfg)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "run" / "model_index.json").exists()
    fused = load_model(str(base_sd_dir), lora=str(tmp_path / "run"), device="cpu")
    assert fused.guidance_mode == "cfg" and fused.lora and len(result.losses) == 2
    # every adapter (attention, convs, time projections) survives the round trip: the fused UNet
    # predicts what the trained one did, and not what the base does
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(base_sd_dir, subfolder="unet")
    x, c = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 77, 32)
    with torch.no_grad():
        trained, served, base = (m(x, 500, c).sample for m in (result.unet.eval(), fused.unet, plain))
    torch.testing.assert_close(served, trained, atol=1e-5, rtol=1e-4)
    assert (served - base).abs().max() > 100 * (served - trained).abs().max()


def test_lcf_mode_fine_tunes_an_lcm_without_a_teacher(tmp_path, lcm_sd_dir, scenes):
    from diffusers import UNet2DConditionModel

    cfg = small(tmp_path, mode="lcf", teacher=str(lcm_sd_dir), data=str(scenes), lr=1e-3, samples=1, loss="huber",
                gradient_checkpointing=True)
    distill(cfg)
    model = load_model(str(tmp_path / "run"), device="cpu")
    assert model.guidance_mode == "embedding"
    start = UNet2DConditionModel.from_pretrained(lcm_sd_dir, subfolder="unet")
    moved = max((a - b).abs().max().item() for a, b in zip(model.unet.parameters(), start.parameters()))
    assert moved > 1e-6
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


def test_lcf_adapter_trains_a_style_adapter_the_engine_serves_per_request(tmp_path, lcm_sd_dir, scenes):
    """--lcf-adapter: LCF trains a LoRA on the LCM (its weights stay) and saves the adapter file that
    --adapter loads; a row with it differs from the plain row, which is unchanged."""
    from lcmserve.engine import LCMSampler, Row
    from lcmserve.engine.adapters import AdapterSet

    cfg = small(tmp_path, mode="lcf", teacher=str(lcm_sd_dir), data=str(scenes), lr=1e-2, lcf_adapter=True,
                lora_rank=4, lora_alpha=4, lora_targets=["to_q", "to_v", "conv1"])
    distill(cfg)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "run" / "model_index.json").exists()
    model = load_model(str(lcm_sd_dir), device="cpu", dtype="float32")
    adapters = AdapterSet(model)
    style = adapters.load("style", str(tmp_path / "run"))
    assert style.describe()["ranks"] == [4] and style.describe()["modules"] > 0
    sampler = LCMSampler(model, adapters=adapters)
    plain, styled = sampler.run_rows([Row("a cat", 1, 8.0), Row("a cat", 1, 8.0, adapters={"style": 1.0})], 2, 64,
                                     64).images
    assert (plain - styled).abs().max() > 1e-3
    with pytest.raises(InvalidInputError, match="lcf_adapter: only mode lcf"):
        small(tmp_path, mode="lcd", teacher=str(lcm_sd_dir), lcf_adapter=True)


def test_caption_rewrite_distils_an_adapter_towards_the_lcm_on_the_rewritten_captions(tmp_path, lcm_sd_dir, scenes,
                                                                                       monkeypatch):
    """caption_rewrite: the adapter's target is the frozen LCM on rewrite(c). At the start (LoRA B = 0) the
    loss is the LCM on c against the LCM on rewrite(c), zero for the identity; training shrinks it."""
    from lcmserve.models import registry

    monkeypatch.setitem(registry._caption_rewrites, "same", lambda c: c)
    monkeypatch.setitem(registry._caption_rewrites, "colours", lambda c: c.replace("red", "blue").replace("a ", "two "))
    common = dict(mode="lcf", teacher=str(lcm_sd_dir), data=str(scenes), lcf_adapter=True, lora_targets=["to_k", "to_v"],
                  overfit_batches=1, ema_decay=0.5)
    same = distill(small(tmp_path, **common, caption_rewrite="same", steps=1, lr=1e-2))
    assert same.losses[0] < 1e-9  # float rounding only: the same function on the same input
    run = distill(small(tmp_path, **common, caption_rewrite="colours", out=str(tmp_path / "rw"), steps=12, lr=3e-2))
    assert run.losses[0] > 0 and sum(run.losses[-3:]) / 3 < 0.7 * run.losses[0], run.losses
    assert (tmp_path / "rw" / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(InvalidInputError, match="caption_rewrite: distils an adapter"):
        small(tmp_path, mode="lcf", teacher=str(lcm_sd_dir), caption_rewrite="same")
    with pytest.raises(InvalidInputError, match=r"caption_rewrite must be one of .*colours.*; got 'nope'"):
        small(tmp_path, mode="lcf", teacher=str(lcm_sd_dir), lcf_adapter=True, caption_rewrite="nope")


def test_sdxl_teacher_distils_into_an_sdxl_lcm(tmp_path, base_sdxl_dir):
    result = distill(small(tmp_path, teacher=str(base_sdxl_dir), steps=1, solver="dpmsolver"))
    assert len(result.losses) == 1 and result.losses[0] > 0
    model = load_model(str(tmp_path / "run"), device="cpu")
    assert model.family == "sdxl" and model.guidance_mode == "embedding"


def test_lcd_student_can_start_from_an_earlier_lcm(tmp_path, tiny):
    """--init-student: the student is that LCM's UNet, guidance embedding included (to follow a retrained teacher)."""
    from lcmserve.distill.lcd import lcd_student_from

    teacher, student = tiny[0], tiny[1]
    student.save_pretrained(tmp_path / "lcm" / "unet")
    again = lcd_student_from(teacher, tmp_path / "lcm")
    assert again.training and all(p.requires_grad for p in again.parameters())
    for (name, a), b in zip(again.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    teacher.save_pretrained(tmp_path / "base")
    with pytest.raises(InvalidInputError, match="init_student.*guidance embedding"):
        lcd_student_from(teacher, tmp_path / "base")
    with pytest.raises(InvalidInputError, match="init_student.*no UNet"):
        lcd_student_from(teacher, tmp_path / "nothing")
    other = build_preset_pipeline("tiny-sd", lcm=True, seed=1).unet
    if {k: v.shape for k, v in other.state_dict().items()} != {k: v.shape for k, v in student.state_dict().items()}:
        other.save_pretrained(tmp_path / "other")
        with pytest.raises(InvalidInputError, match="architecture"):
            lcd_student_from(teacher, tmp_path / "other")
    with pytest.raises(InvalidInputError, match="init_student"):
        small(tmp_path, teacher="t", mode="lora", init_student=str(tmp_path / "lcm"))
