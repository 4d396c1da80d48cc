"""The shipped shapes models: the teacher loads in diffusers; the judges score known cases right."""

import random

import pytest
import torch

from lcmserve.eval.judge import ShapesJudge, scene_key
from lcmserve.eval.metrics import attribute_accuracy, clip_score, frechet_distance
from lcmserve.eval.run import real_images
from lcmserve.shapes.bundle import CLASSIFIER, CLIP, TEACHER, weights_dir
from lcmserve.shapes.scenes import caption_for_index, scene_for_index

pytestmark = pytest.mark.skipif(
    not (weights_dir() / TEACHER).exists(), reason="the shapes weights are not bundled in this checkout"
)
N = 400


@pytest.fixture(scope="module")
def judge():
    return ShapesJudge()


@pytest.fixture(scope="module")
def heldout():
    pairs = [caption_for_index(i, "heldout", 5000) for i in range(N)]
    scenes, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    return scenes, captions, real_images(scenes)


def test_bundle_is_small():
    total = sum(f.stat().st_size for f in weights_dir().rglob("*") if f.is_file())
    assert total < 25 * 2**20, total


def test_shipped_teacher_loads_and_samples_in_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(weights_dir() / TEACHER, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim is None  # a plain teacher, not an LCM
    out = pipe("a large red circle in the center on a white background", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_classifier_reads_real_renders(judge, heldout):
    scenes, _, images = heldout
    result = attribute_accuracy(judge.read(images), [scene_key(s) for s in scenes])
    assert result["accuracy"] > 0.97, result


def test_shuffled_captions_drop_clip_score_and_accuracy(judge, heldout):
    scenes, captions, images = heldout
    order = list(range(N))
    random.Random(0).shuffle(order)
    img = judge.image_embeds(images)
    right = clip_score(img, judge.text_embeds(captions))
    wrong = clip_score(img, judge.text_embeds([captions[i] for i in order]))
    assert right > wrong + 5, (right, wrong)
    wrong_acc = attribute_accuracy(judge.read(images), [scene_key(scenes[i]) for i in order])["accuracy"]
    assert wrong_acc < 0.1


def test_real_renders_score_near_the_floor(judge, heldout):
    _, _, images = heldout
    other = real_images([scene_for_index(i, "heldout", 6000) for i in range(N)])
    floor = frechet_distance(judge.image_features(images).numpy(), judge.image_features(other).numpy())
    # Degraded renders are measurably farther away: blurred to 8x8 blocks, and with pixel noise.
    reference = judge.image_features(other).numpy()
    blurred = torch.nn.functional.avg_pool2d(images, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for degraded in (blurred, noisy):
        far = frechet_distance(judge.image_features(degraded).numpy(), reference)
        assert far > 2 * floor, (floor, far)


def test_clip_and_classifier_files_exist():
    assert (weights_dir() / CLIP / "config.json").exists()
    assert (weights_dir() / CLASSIFIER).exists()
