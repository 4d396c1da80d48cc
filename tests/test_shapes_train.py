"""The training recipes end to end on a few steps: checkpoints, resume, bundle, diffusers loads it."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lcmserve.shapes.train as T
from lcmserve.errors import InvalidInputError
from lcmserve.shapes.bundle import bundle


def tiny(stage, out, **kw):
    return T.StageConfig(stage, str(out), steps=4, batch_size=4, checkpoint_every=2, warmup_steps=1, **kw)


def test_kill_and_resume_continues_at_the_right_step_with_the_same_data(tmp_path, monkeypatch):
    straight = T.train(tiny("classifier", tmp_path / "a"))
    real_batch = T.batch_for_step
    seen = []

    def dying_batch(seed, stage, step, batch_size, splits=("train",)):
        seen.append(step)
        if step == 3 and len(seen) == 4:
            raise KeyboardInterrupt  # the process dies after the checkpoint at step 2
        return real_batch(seed, stage, step, batch_size, splits)

    monkeypatch.setattr(T, "batch_for_step", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        T.train(tiny("classifier", tmp_path / "b", seed=0))
    # Killed during step 3 (0-based); the last checkpoint was written after two steps.
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    seen.clear()
    T.train(tiny("classifier", tmp_path / "b", seed=0))
    assert seen == [2, 3]
    a = load_file(straight / "classifier.safetensors")
    b = load_file(tmp_path / "b" / "classifier.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    losses = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["losses"]
    assert len(losses) == 4


def test_full_chain_writes_a_pipeline_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    clip = T.train(tiny("clip", tmp_path / "clip"))
    vae = T.train(tiny("vae", tmp_path / "vae"))
    teacher = T.train(tiny("teacher", tmp_path / "teacher", clip_dir=str(clip), vae_dir=str(vae), latent_cache=8))
    cache = torch.load(tmp_path / "teacher" / "latent-cache.pt", weights_only=False)
    assert cache["mean"].shape == (8, 4, 16, 16) and (cache["std"] > 0).all()
    # Rendering and encoding every step trains too, and a second UNet can start from the first.
    again = T.train(tiny("teacher", tmp_path / "teacher2", clip_dir=str(clip), vae_dir=str(vae), latent_cache=0,
                         init_unet=str(teacher / "unet")))
    assert not (again / "latent-cache.pt").exists() and (again / "unet" / "config.json").exists()
    classifier = T.train(tiny("classifier", tmp_path / "cls"))
    out = bundle(clip, vae, teacher, classifier, tmp_path / "weights")
    assert json.loads((out / "training-configs.json").read_text())["teacher"]["steps"] == 4
    pipe = StableDiffusionPipeline.from_pretrained(out / "shapes-teacher", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle at the top left on a white background", num_inference_steps=2,
                 output_type="pt").images
    assert image.shape == (1, 3, 64, 64)
    assert pipe.unet.dtype == torch.float32
    assert next(iter(load_file(out / "shapes-classifier.safetensors").values())).dtype == torch.float16


def test_bad_stage_configs():
    with pytest.raises(InvalidInputError, match="stage must be one of clip, vae, teacher, classifier"):
        T.StageConfig("gan", "x")
    with pytest.raises(InvalidInputError, match="steps must be an integer >= 1"):
        T.StageConfig("vae", "x", steps=-1)
    with pytest.raises(InvalidInputError, match="lr must be a finite number > 0"):
        T.StageConfig("vae", "x", lr=float("nan"))
    with pytest.raises(InvalidInputError, match="clip_dir: the teacher needs a trained clip folder") as err:
        T.StageConfig("teacher", "x", vae_dir=".")
    assert err.value.param == "clip_dir"
