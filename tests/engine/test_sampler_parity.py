"""Our sampler against diffusers' own pipelines on the same weights and seeds (fp32, CPU)."""

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from lcmserve.engine import LCMSampler, Row
from lcmserve.models import load_model

PROMPTS = ["a red circle at the top left", "a photo of a cat", "blue square"]
SEEDS = [0, 7, 123]
TOL = 1e-4


def ours(folder, rows, steps, size=64, **load_kw):
    sampler = LCMSampler(load_model(str(folder), device="cpu", dtype="float32", **load_kw))
    return sampler.run_rows(rows, steps, size, size).images


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sd_lcm_matches_latent_consistency_pipeline(lcm_sd_dir, steps):
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_sd_dir, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    w = 6.5
    expected = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=w, generator=generators(SEEDS),
                    height=64, width=64, output_type="pt").images
    got = ours(lcm_sd_dir, [Row(p, s, w) for p, s in zip(PROMPTS, SEEDS)], steps)
    assert got.shape == expected.shape == (3, 3, 64, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("steps", [1, 4])
def test_v_prediction_lcm_matches_pipeline(lcm_sd_v_dir, steps):
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_sd_v_dir, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    expected = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=3.0, generator=generators(SEEDS[:2]),
                    height=64, width=64, output_type="pt").images
    got = ours(lcm_sd_v_dir, [Row(p, s, 3.0) for p, s in zip(PROMPTS[:2], SEEDS[:2])], steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sdxl_lcm_matches_sdxl_pipeline(lcm_sdxl_dir, steps):
    pipe = StableDiffusionXLPipeline.from_pretrained(lcm_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    w = 8.0
    expected = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=w, generator=generators(SEEDS[:2]),
                    height=64, width=64, output_type="pt").images
    got = ours(lcm_sdxl_dir, [Row(p, s, w) for p, s in zip(PROMPTS[:2], SEEDS[:2])], steps)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def _lora_reference(base_dir, lora_dir, pipeline_cls):
    pipe = pipeline_cls.from_pretrained(base_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_base_plus_lora_matches_diffusers(base_sd_dir, lora_sd_dir, w):
    """LCM-LoRA on a base model: one pass at w <= 1, classifier-free guidance above (as diffusers)."""
    pipe = _lora_reference(base_sd_dir, lora_sd_dir, StableDiffusionPipeline)
    expected = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=w, generator=generators(SEEDS[:2]),
                    height=64, width=64, output_type="pt").images
    got = ours(base_sd_dir, [Row(p, s, w) for p, s in zip(PROMPTS[:2], SEEDS[:2])], 4, lora=str(lora_sd_dir))
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_sdxl_base_plus_lora_with_cfg_matches_diffusers(base_sdxl_dir, lora_sdxl_dir):
    pipe = _lora_reference(base_sdxl_dir, lora_sdxl_dir, StableDiffusionXLPipeline)
    expected = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=1.5, generator=generators(SEEDS[:2]),
                    height=64, width=64, output_type="pt").images
    got = ours(base_sdxl_dir, [Row(p, s, 1.5) for p, s in zip(PROMPTS[:2], SEEDS[:2])], 2, lora=str(lora_sdxl_dir))
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


NEGATIVES = ["blurry, low quality", "a dog"]


@pytest.mark.parametrize("pipeline_cls", [StableDiffusionPipeline, StableDiffusionXLPipeline], ids=["sd", "sdxl"])
def test_negative_prompt_matches_diffusers(base_sd_dir, lora_sd_dir, base_sdxl_dir, lora_sdxl_dir, pipeline_cls):
    """A negative prompt replaces the empty prompt of classifier-free guidance, as diffusers' negative_prompt."""
    base, lora = (base_sd_dir, lora_sd_dir) if pipeline_cls is StableDiffusionPipeline else (base_sdxl_dir, lora_sdxl_dir)
    pipe = _lora_reference(base, lora, pipeline_cls)
    expected = pipe(PROMPTS[:2], negative_prompt=NEGATIVES, num_inference_steps=2, guidance_scale=2.0,
                    generator=generators(SEEDS[:2]), height=64, width=64, output_type="pt").images
    rows = [Row(p, s, 2.0, n) for p, s, n in zip(PROMPTS[:2], SEEDS[:2], NEGATIVES)]
    got = ours(base, rows, 2, lora=str(lora))
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    # ...and it changes the image (the rows without one are the other parity tests).
    plain = ours(base, [Row(p, s, 2.0) for p, s in zip(PROMPTS[:2], SEEDS[:2])], 2, lora=str(lora))
    assert (got - plain).abs().max() > 1e-3


def test_negative_prompt_rows_mix_in_a_batch(base_sdxl_dir, lora_sdxl_dir):
    """Rows with and without a negative prompt (SDXL: zeros for an empty one) equal the same rows alone."""
    sampler = LCMSampler(load_model(str(base_sdxl_dir), lora=str(lora_sdxl_dir), device="cpu"))
    rows = [Row("a red circle", 1, 2.0, "a dog"), Row("a photo of a cat", 2, 2.5), Row("blue", 3, 1.0, "red")]
    batch = sampler.run_rows(rows, 2, 64, 64).images
    for i, row in enumerate(rows):
        torch.testing.assert_close(batch[i], sampler.run_rows([row], 2, 64, 64).images[0], rtol=0, atol=1e-5)


def test_negative_prompt_is_refused_by_an_embedding_lcm(lcm_sd_dir):
    from lcmserve.engine import GenerationRequest
    from lcmserve.errors import InvalidInputError

    sampler = LCMSampler(load_model(str(lcm_sd_dir), device="cpu"))
    with pytest.raises(InvalidInputError, match="negative_prompt: this model takes guidance as an embedding") as err:
        sampler.resolve(GenerationRequest("a cat", negative_prompt="a dog"))
    assert err.value.param == "negative_prompt"
    with pytest.raises(InvalidInputError, match="negative_prompt"):
        sampler.run_rows([Row("a cat", 0, 8.0, "a dog")], 1, 64, 64)
    with pytest.raises(InvalidInputError, match="negative_prompt must not contain NUL"):
        sampler.resolve(GenerationRequest("a cat", negative_prompt="a\x00"))
    assert sampler.resolve(GenerationRequest("a cat", negative_prompt="")).negative_prompt == ""


def test_guidance_default_follows_the_model(lcm_sd_dir, base_sd_dir, lora_sd_dir):
    """No guidance_scale: w 8 for a distilled LCM; 1 (one pass, no CFG) for an LCM-LoRA, whose range is 1-2."""
    from lcmserve.engine import GenerationRequest

    lcm = LCMSampler(load_model(str(lcm_sd_dir), device="cpu"))
    lora = LCMSampler(load_model(str(base_sd_dir), lora=str(lora_sd_dir), device="cpu"))
    assert lcm.resolve(GenerationRequest("a cat")).guidance_scale == 8.0
    assert lora.resolve(GenerationRequest("a cat")).guidance_scale == 1.0
    assert lora.resolve(GenerationRequest("a cat", guidance_scale=1.5)).guidance_scale == 1.5
    assert lora.model.describe()["default_guidance_scale"] == 1.0
    by_default = lora.generate(GenerationRequest("a cat", steps=2, seed=4)).images
    torch.testing.assert_close(by_default, lora.run_rows([Row("a cat", 4, 1.0)], 2, 64, 64).images, rtol=0, atol=0)


def test_lora_changes_the_model(base_sd_dir, lora_sd_dir):
    rows = [Row(PROMPTS[0], 0, 1.0)]
    base = DiffusionPipeline.from_pretrained(base_sd_dir)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    plain = base(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, generator=generators([0]), height=64,
                 width=64, output_type="pt").images
    fused = ours(base_sd_dir, rows, 2, lora=str(lora_sd_dir))
    assert (plain - fused).abs().max() > 1e-3


@pytest.mark.parametrize("folder", ["lcm_sd_dir", "lcm_sdxl_dir"])
def test_batch_invariance(folder, request):
    """Row i of a mixed batch equals the same row generated alone."""
    path = request.getfixturevalue(folder)
    sampler = LCMSampler(load_model(str(path), device="cpu"))
    rows = [Row("a red circle", 3, 8.0), Row("a photo of a cat", 11, 1.0), Row("", 5, 4.5), Row("blue", 3, 2.0)]
    batch = sampler.run_rows(rows, 4, 64, 64).images
    for i, row in enumerate(rows):
        alone = sampler.run_rows([row], 4, 64, 64).images[0]
        torch.testing.assert_close(batch[i], alone, rtol=0, atol=1e-5)
    # Rows that differ only in seed or guidance really do give different images.
    assert (batch[0] - batch[3]).abs().max() > 1e-3


def test_lora_cfg_batch_invariance(base_sd_dir, lora_sd_dir):
    """With CFG, rows at w <= 1 in a guided batch still equal the same rows alone."""
    sampler = LCMSampler(load_model(str(base_sd_dir), lora=str(lora_sd_dir), device="cpu"))
    rows = [Row("a red circle", 1, 1.0), Row("a photo of a cat", 2, 2.5)]
    batch = sampler.run_rows(rows, 2, 64, 64).images
    for i, row in enumerate(rows):
        torch.testing.assert_close(batch[i], sampler.run_rows([row], 2, 64, 64).images[0], rtol=0, atol=1e-5)


def test_seeds_reproduce_and_request_seeds_follow_images(lcm_sd_dir):
    from lcmserve.engine import GenerationRequest

    sampler = LCMSampler(load_model(str(lcm_sd_dir), device="cpu"), max_batch_size=2)
    result = sampler.generate(GenerationRequest("a cat", num_images=3, steps=2, seed=40))
    assert result.seeds == [40, 41, 42]
    # Image 2 was made in a second batch of the request; alone it is the same.
    alone = sampler.generate(GenerationRequest("a cat", num_images=1, steps=2, seed=42))
    torch.testing.assert_close(result.images[2], alone.images[0], rtol=0, atol=1e-5)
    again = sampler.generate(GenerationRequest("a cat", num_images=3, steps=2, seed=40))
    assert torch.equal(result.images, again.images)


def test_bf16_stays_close_to_fp32(lcm_sd_dir):
    rows = [Row("a red circle", 0, 8.0), Row("a cat", 1, 4.0)]
    fp32 = LCMSampler(load_model(str(lcm_sd_dir), device="cpu", dtype="float32")).run_rows(rows, 4, 64, 64).images
    bf16 = LCMSampler(load_model(str(lcm_sd_dir), device="cpu", dtype="bfloat16")).run_rows(rows, 4, 64, 64).images
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().mean() < 0.02
