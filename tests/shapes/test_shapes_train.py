"""The training recipes end to end on a few steps: checkpoints, resume, bundle, diffusers loads it."""

import json
import math

import numpy as np
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


@pytest.fixture(scope="module")
def clip_and_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return T.train(tiny("clip", root / "clip")), T.train(tiny("vae", root / "vae"))


def test_full_chain_writes_a_pipeline_diffusers_loads(tmp_path, clip_and_vae):
    from diffusers import StableDiffusionPipeline

    clip, vae = clip_and_vae
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


def test_bad_device_workers_and_time_budget(monkeypatch):
    with pytest.raises(InvalidInputError, match="device must be auto, cpu, cuda or cuda:N") as err:
        T.StageConfig("vae", "x", device="tpu")
    assert err.value.param == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(InvalidInputError, match="torch sees no CUDA GPU") as err:
            T.StageConfig("vae", "x", device=spec)
        assert err.value.param == "device"
    assert T.StageConfig("vae", "x", device="cpu").device == "cpu"
    with pytest.raises(InvalidInputError, match="num_workers must be an integer >= 0") as err:
        T.StageConfig("vae", "x", num_workers=-1)
    assert err.value.param == "num_workers"
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="max_minutes must be a finite number >= 0") as err:
            T.StageConfig("classifier", "x", max_minutes=bad)
        assert err.value.param == "max_minutes"


class FakeClock:
    """Stands in for lcmserve.shapes.train's `time`: a step costs what the test says, not what the CPU takes."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def _budget_run(tmp_path, monkeypatch, step_cost, probe_step=None):
    clock, seen = FakeClock(), {}
    monkeypatch.setattr(T, "time", clock)
    monkeypatch.setattr(T, "MEASURE_STEPS", 5)
    monkeypatch.setattr(T, "FINISH_RESERVE_S", 0.0)
    cfg = T.StageConfig("classifier", str(tmp_path), steps=100_000, batch_size=1, lr=0.1, warmup_steps=2,
                        checkpoint_every=50, max_minutes=0.02)  # a budget of 1.2 s of fake time, 0.9 s of it left
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(8, 3)

    def step_fn(step: int) -> torch.Tensor:
        if step == probe_step:  # the checkpoint of step 50 holds the lr the 51st step trains with
            seen["probe"] = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
        clock.now += step_cost(step)
        seen["calls"] = seen.get("calls", 0) + 1
        return lin(x).pow(2).mean()

    # started: the process began 0.3 s before the loop (loading models), which counts against the budget
    losses = T.run_loop(cfg, {"lin": lin}, list(lin.parameters()), step_fn, started=-0.3)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    return cfg, losses, ckpt, seen


def test_max_minutes_cuts_the_run_to_the_measured_speed_and_ends_the_cosine(tmp_path, monkeypatch):
    # 0.01 s a step: after 5 steps (0.05 s) the remaining 0.85 s fit about 85 more steps.
    cfg, losses, ckpt, seen = _budget_run(tmp_path, monkeypatch, lambda step: 0.01, probe_step=50)
    total = ckpt["total_steps"]
    assert 88 <= total <= 91, total
    assert ckpt["step"] == total and seen["calls"] == total and len(losses) == len(ckpt["losses"]) == total
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == total == cfg.steps
    # The cosine follows the cut total: part-way down at step 50, and at zero after the last step.
    probe = seen["probe"]
    assert probe["step"] == 50 and probe["total_steps"] == total
    expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (50 - 2) / (total - 2)))
    assert probe["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected, rel=1e-6)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)



def test_max_minutes_does_not_time_the_warm_up_steps(tmp_path, monkeypatch):
    # The first WARM_STEPS steps are slow (a compile), later ones 0.01 s: the plan follows the later speed.
    warm = T.WARM_STEPS
    cfg, losses, ckpt, seen = _budget_run(tmp_path, monkeypatch, lambda step: 0.03 if step < warm else 0.01)
    # 0.3 s for the warm steps and 0.05 s for the timed ones leave 0.55 s: about 55 more steps.
    assert 68 <= ckpt["total_steps"] <= 72, ckpt["total_steps"]

def test_max_minutes_stops_a_run_that_slows_down_at_the_deadline(tmp_path, monkeypatch):
    # The measured speed promises ~90 steps, but from step 5 on a step costs 0.05 s: the deadline
    # (0.9 s after the loop began) passes after about 17 slow steps; the run stops there, its record consistent.
    cfg, losses, ckpt, seen = _budget_run(tmp_path, monkeypatch, lambda step: 0.01 if step < 5 else 0.05)
    total = ckpt["total_steps"]
    assert 21 <= total <= 24, total
    assert ckpt["step"] == total and seen["calls"] == total and len(losses) == total
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == total == cfg.steps
    # Run again on the same folder with the original step count: the recorded total holds, nothing more runs.
    called = []
    again = T.StageConfig("classifier", str(tmp_path), steps=100_000, batch_size=1, lr=0.1, warmup_steps=2,
                          checkpoint_every=50)
    lin = torch.nn.Linear(3, 1)
    T.run_loop(again, {"lin": lin}, list(lin.parameters()), lambda step: called.append(step))
    assert called == []
    torch.testing.assert_close(lin.weight, ckpt["modules"]["lin"]["weight"])


@pytest.fixture(scope="module")
def teacher_data():
    from transformers import CLIPTokenizer

    from lcmserve.shapes.bundle import CLIP, TEACHER, model_dir, resolve_run, weights_dir

    if not ((weights_dir() / TEACHER).exists() and (weights_dir() / CLIP).exists()):
        pytest.skip("the shapes weights are not bundled in this checkout")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir(resolve_run("shipped", "clip"), "tokenizer"))
    cfg = T.StageConfig("teacher", "unused", clip_dir="shipped", vae_dir="shipped", batch_size=4, steps=50,
                        latent_cache=40, seed=3)
    scenes, _ = T.training_scenes(cfg.seed, cfg.latent_cache)
    return cfg, tokenizer, scenes


def _assert_items_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_teacher_steps_are_a_pure_function_of_seed_and_step(teacher_data):
    cfg, tokenizer, scenes = teacher_data
    for source in (scenes, None):  # from the latent cache's scenes, or rendered every step
        data = T.TeacherSteps(cfg, tokenizer, (4, 16, 16), 1000, source)
        first = data[7]
        assert set(first) == ({"idx"} if source else {"images"}) | {"eps", "ids", "noise", "t"}
        assert first["eps"].shape == first["noise"].shape == (4, 4, 16, 16) and first["ids"].shape[0] == 4
        _assert_items_equal(first, T.TeacherSteps(cfg, tokenizer, (4, 16, 16), 1000, source)[7])
        other = data[8]
        assert not torch.equal(first["noise"], other["noise"]) and not torch.equal(first["eps"], other["eps"])
    cached = T.TeacherSteps(cfg, tokenizer, (4, 16, 16), 1000, scenes)
    reseeded = T.TeacherSteps(T.StageConfig("teacher", "unused", clip_dir="shipped", vae_dir="shipped",
                                            batch_size=4, steps=50, seed=4), tokenizer, (4, 16, 16), 1000, scenes)
    assert not torch.equal(reseeded[7]["noise"], cached[7]["noise"])
    assert not torch.equal(reseeded[7]["idx"], cached[7]["idx"])


def test_full_captions_replace_a_share_of_the_captions_and_leave_every_other_draw(teacher_data):
    """``full_captions`` swaps that share of a batch's captions for the full template caption (it states every
    attribute); the scenes, noise and timesteps are those of the run without it."""
    from dataclasses import replace

    from lcmserve.shapes.scenes import parse_caption

    cfg, tokenizer, scenes = teacher_data
    cfg = replace(cfg, batch_size=32, caption_dropout=0.0)
    plain = T.TeacherSteps(cfg, tokenizer, (4, 16, 16), 1000, scenes)[5]
    for share, lo, hi in ((0.5, 6, 26), (1.0, 32, 32)):
        mixed = T.TeacherSteps(replace(cfg, full_captions=share), tokenizer, (4, 16, 16), 1000, scenes)[5]
        for key in ("idx", "eps", "noise", "t"):
            assert torch.equal(mixed[key], plain[key])
        texts = tokenizer.batch_decode(mixed["ids"], skip_special_tokens=True)
        full = sum(_parses(parse_caption, t, scenes[i]) for t, i in zip(texts, mixed["idx"].tolist()))
        assert lo <= full <= hi, (share, full)
    with pytest.raises(InvalidInputError, match="full_captions"):
        T.StageConfig("teacher", "x", clip_dir=".", vae_dir=".", full_captions=1.5)


def test_unplaced_captions_recaption_a_share_of_two_object_scenes_only(teacher_data):
    from dataclasses import replace

    cfg, tokenizer, scenes = teacher_data
    cfg = replace(cfg, batch_size=32, caption_dropout=0.0)
    plain = T.TeacherSteps(cfg, tokenizer, (4, 16, 16), 1000, scenes)[5]
    mixed = T.TeacherSteps(replace(cfg, unplaced_captions=1.0), tokenizer, (4, 16, 16), 1000, scenes)[5]
    for key in ("idx", "eps", "noise", "t"):
        assert torch.equal(mixed[key], plain[key])
    changed = (mixed["ids"] != plain["ids"]).any(dim=1).tolist()
    two = [len(scenes[i].objects) == 2 for i in mixed["idx"].tolist()]
    assert all(t for t, c in zip(two, changed) if c) and sum(changed) >= sum(two) - 2 > 0
    with pytest.raises(InvalidInputError, match="unplaced_captions"):
        T.StageConfig("teacher", "x", clip_dir=".", vae_dir=".", unplaced_captions=-0.1)


def _parses(parse, text: str, scene) -> bool:
    try:
        return parse(text) == scene
    except ValueError:
        return False


def test_step_stream_workers_give_the_items_of_the_dataset(teacher_data):
    cfg, tokenizer, scenes = teacher_data
    data = T.TeacherSteps(cfg, tokenizer, (4, 16, 16), 1000, scenes)
    stream = T._StepStream(data, num_workers=2, pin=False)
    for step in (0, 1, 2, 3, 10, 11):  # consecutive steps, then a jump (a resume) and on from there
        _assert_items_equal(stream.get(step), data[step])
    assert T._StepStream(data, num_workers=0, pin=False).get(5).keys() == data[5].keys()


def test_training_scenes_in_worker_processes_match_one_process():
    scenes, images = T.training_scenes(0, 300, workers=0, with_images=True, chunk=64)
    pooled, pooled_images = T.training_scenes(0, 300, workers=2, with_images=True, chunk=64)
    assert len(scenes) == 300 and scenes == pooled
    assert len(images) == len(pooled_images) == 5  # chunks of 64 scenes
    for a, b in zip(images, pooled_images):
        assert a.dtype == np.uint8 and np.array_equal(a, b)
    whole = np.concatenate(images)
    assert whole.shape[0] == 300
    from lcmserve.shapes.scenes import render

    assert np.array_equal(whole[123], np.asarray(render(scenes[123]), dtype=np.uint8))
    assert T.training_scenes(0, 300, workers=2)[1] is None


def test_teacher_can_train_its_text_encoder_and_the_bundle_ships_it(tmp_path, clip_and_vae):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    clip, vae = clip_and_vae
    tower = CLIPModel.from_pretrained(clip / "model").text_model.state_dict()
    frozen = T.train(tiny("teacher", tmp_path / "frozen", clip_dir=str(clip), vae_dir=str(vae), latent_cache=8))
    trained = T.train(tiny("teacher", tmp_path / "trained", clip_dir=str(clip), vae_dir=str(vae), latent_cache=8,
                           train_text_encoder=True, lr=1e-2))

    def weights(run):
        state = load_file(run / "text_encoder" / "model.safetensors")
        return {k.removeprefix("text_model."): v for k, v in state.items()}

    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(weights(frozen)[key], tower[key])  # frozen: a copy of the domain CLIP's text tower
    assert not torch.allclose(weights(trained)[key], tower[key])  # trained with the UNet
    assert "text_encoder" in torch.load(trained / "checkpoint.pt", weights_only=False)["modules"]
    classifier = T.train(tiny("classifier", tmp_path / "cls"))
    out = bundle(clip, vae, trained, classifier, tmp_path / "weights")
    pipe = StableDiffusionPipeline.from_pretrained(out / "shapes-teacher", dtype=torch.float32)
    shipped = pipe.text_encoder.state_dict()
    shipped = {k.removeprefix("text_model."): v for k, v in shipped.items()}
    torch.testing.assert_close(shipped[key], weights(trained)[key].half().float())
    # Continuing that teacher starts from its own text encoder, not from the CLIP's.
    cont = T.StageConfig("teacher", str(tmp_path / "c"), clip_dir=str(clip), vae_dir=str(vae),
                         init_unet=str(out / "shapes-teacher"))
    start = T.teacher_text_encoder(cont, tmp_path / "c" / "tokenizer")[0].state_dict()
    torch.testing.assert_close({k.removeprefix("text_model."): v for k, v in start.items()}[key], shipped[key])


def test_latent_cache_key_follows_the_weights_not_the_config_bookkeeping(tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    from lcmserve.engine.cache import fingerprint_module
    from lcmserve.shapes.bundle import TEACHER, weights_dir

    shipped = weights_dir() / TEACHER / "vae"
    shutil.copytree(shipped, tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    (tmp_path / "copy" / "config.json").write_text(json.dumps({**config, "_diffusers_version": "9"}, indent=2))
    vae = AutoencoderKL.from_pretrained(shipped)
    key = fingerprint_module(vae)
    assert fingerprint_module(AutoencoderKL.from_pretrained(tmp_path / "copy")) == key  # same VAE, other folder
    assert fingerprint_module(AutoencoderKL.from_pretrained(shipped, scaling_factor=0.5)) != key
    assert fingerprint_module(AutoencoderKL.from_pretrained(shipped)) == key
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert fingerprint_module(vae) != key


def test_vae_decoder_fine_tune_keeps_the_latent_space(tmp_path, clip_and_vae):
    from diffusers import AutoencoderKL

    _, vae = clip_and_vae
    with pytest.raises(InvalidInputError, match="decoder_only"):
        T.StageConfig("vae", str(tmp_path / "x"), decoder_only=True)  # nothing to start from
    with pytest.raises(InvalidInputError, match="fg_weight"):
        T.StageConfig("vae", str(tmp_path / "x"), fg_weight=0.5)
    with pytest.raises(InvalidInputError, match="ring_weight"):
        T.StageConfig("vae", str(tmp_path / "x"), ring_weight=0)
    tuned = T.train(tiny("vae", tmp_path / "dec", vae_dir=str(vae), decoder_only=True, lr=1e-2, fg_weight=3,
                         ring_weight=4))
    before = AutoencoderKL.from_pretrained(vae / "model")
    after = AutoencoderKL.from_pretrained(tuned / "model")
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(a[k], b[k]) for k in b if k.startswith("decoder."))
    assert after.config.scaling_factor == before.config.scaling_factor


def test_a_trained_text_tower_moves_onto_a_new_vocabulary(tmp_path):
    """Old tokens keep their embeddings (so an old caption reads the same), new words start from an alias."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from transformers import CLIPTokenizer

    from lcmserve.models.tokenizer import write_clip_tokenizer
    from lcmserve.shapes.models import carry_text_embeddings

    old = CLIPTokenizer.from_pretrained(write_clip_tokenizer(["a", "big", "red", "circle"], tmp_path / "o",
                                                             model_max_length=8))
    new = CLIPTokenizer.from_pretrained(write_clip_tokenizer(["a", "big", "huge", "red", "circle", "dots"],
                                                             tmp_path / "n", model_max_length=12))
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(old), hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=8,
                                         bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
                                         pad_token_id=old.pad_token_id)).eval()
    text = "a big red circle"
    old_emb = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        before = model(old(text, padding="max_length", max_length=8, return_tensors="pt").input_ids)[0]
        carry_text_embeddings(model, old, new, {"huge": "big"})
        after = model(new(text, padding="max_length", max_length=12, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(after[:, :8], before)
    # the pooled output is still read at the end token, whose id changed
    assert model.config.eos_token_id == new.eos_token_id != old.eos_token_id
    with torch.no_grad():
        out = model(new(text, padding="max_length", max_length=12, return_tensors="pt").input_ids)
        ids = new(text, return_tensors="pt").input_ids
        torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, ids.shape[1] - 1])
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(new) and model.config.vocab_size == len(new)
    assert model.config.max_position_embeddings == 12
    torch.testing.assert_close(emb[new.convert_tokens_to_ids("huge</w>")], emb[new.convert_tokens_to_ids("big</w>")])
    pieces = old("dots", add_special_tokens=False).input_ids  # no alias: the mean of what the old tokenizer read
    assert len(pieces) > 1
    torch.testing.assert_close(emb[new.convert_tokens_to_ids("dots</w>")], old_emb[pieces].mean(0))
    model.save_pretrained(tmp_path / "m")
    assert CLIPTextModel.from_pretrained(tmp_path / "m").config.vocab_size == len(new)


def test_a_continued_clip_trains_its_text_tower_on_the_new_vocabulary_and_keeps_its_image_tower(tmp_path,
                                                                                                  clip_and_vae):
    from transformers import CLIPModel

    clip, _ = clip_and_vae
    again = T.train(tiny("clip", tmp_path / "clip2", clip_dir=str(clip), lr=1e-2))
    before, after = (CLIPModel.from_pretrained(run / "model").state_dict() for run in (clip, again))
    vision = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in before if k.startswith("text_model.encoder.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # the FID features stay
    assert not all(torch.equal(before[k], after[k]) for k in text)
