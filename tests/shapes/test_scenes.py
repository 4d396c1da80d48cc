"""The shapes domain: deterministic scenes, captions that match them, the held-out split."""

import random

import pytest

from lcmserve.shapes.data import batch_for_step, scene_targets, to_tensor
from lcmserve.shapes.scenes import (
    BACKGROUNDS, CELLS, COLOURS, Scene, ShapeObject, caption, caption_for_index, heldout_triples, is_heldout,
    parse_caption, render, scene_for_index, vocabulary,
)


def test_scenes_and_renders_are_deterministic():
    for i in range(20):
        assert scene_for_index(i) == scene_for_index(i)
        assert caption_for_index(i) == caption_for_index(i)
        assert render(scene_for_index(i)).tobytes() == render(scene_for_index(i)).tobytes()
    assert scene_for_index(0, seed=0) != scene_for_index(0, seed=1) or scene_for_index(1, seed=0) != scene_for_index(
        1, seed=1)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_describe_their_scenes(split):
    for i in range(500):
        scene, text = caption_for_index(i, split)
        assert parse_caption(text) == scene, text
        assert scene.split == split


def test_captions_vary_in_template_and_synonyms():
    scene = Scene("white", (ShapeObject("circle", "red", "small", "top left"),))
    texts = {caption(scene, random.Random(i)) for i in range(200)}
    assert len(texts) > 20
    assert any("disk" in t for t in texts) and any("circle" in t for t in texts)
    assert all(parse_caption(t) == scene for t in texts)


def test_heldout_triples_never_in_training():
    held = set(heldout_triples())
    assert 20 <= len(held) <= 60
    for i in range(2000):
        assert not any(o.triple in held for o in scene_for_index(i, "train").objects)
    assert all(any(is_heldout(o.triple) for o in scene_for_index(i, "heldout").objects) for i in range(300))


def test_render_puts_the_colour_in_the_cell():
    scene = Scene("black", (ShapeObject("square", "blue", "large", "bottom right"),))
    image = render(scene)
    assert image.size == (64, 64)
    assert image.getpixel((53, 53)) == COLOURS["blue"]
    assert image.getpixel((10, 10)) == BACKGROUNDS["black"]


def test_bad_scenes_are_rejected():
    with pytest.raises(ValueError, match="colour must be one of"):
        ShapeObject("circle", "teal", "small", "top")
    with pytest.raises(ValueError, match="distinct cells"):
        Scene("white", (ShapeObject("circle", "red", "small", "top"), ShapeObject("square", "red", "small", "top")))
    with pytest.raises(ValueError, match="no background"):
        parse_caption("a red circle")


def test_targets_and_batches():
    scenes, captions, images = batch_for_step(0, "test", 3, 8)
    again = batch_for_step(0, "test", 3, 8)
    assert captions == again[1] and (images == again[2]).all()
    assert images.shape == (8, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    t = scene_targets(scenes)
    for b, scene in enumerate(scenes):
        assert (t["shape"][b] > 0).sum() == len(scene.objects)
        for obj in scene.objects:
            assert t["colour"][b, CELLS.index(obj.cell)] >= 0
    assert to_tensor([render(scenes[0])]).shape == (1, 3, 64, 64)


def test_vocabulary_covers_every_caption():
    vocab = set(vocabulary())
    for i in range(300):
        _, text = caption_for_index(i)
        assert set(text.replace(",", "").split()) <= vocab


def test_template_captions_name_every_attribute_of_the_same_scenes():
    """``captions="template"`` (the ``-template`` data sources) captions the same scenes with the full template
    captions that the models before the caption language learnt; the scenes and images do not change."""
    from lcmserve.distill.data import open_source

    scenes, language, images = batch_for_step(0, "test", 3, 8)
    same, template, same_images = batch_for_step(0, "test", 3, 8, captions="template")
    assert same == scenes and (same_images == images).all() and template != language
    assert [parse_caption(c) for c in template] == scenes
    with pytest.raises(ValueError, match="captions"):
        batch_for_step(0, "test", 3, 8, captions="poems")
    shifted = open_source("shapes-shifted-template", 0, 4)
    assert shifted.fingerprint()["captions"] == "template"
    assert "captions" not in open_source("shapes", 0, 4).fingerprint()
    assert all(parse_caption(c) for c in shifted.captions)


def test_mixed_captions_replace_about_half_the_language_by_full_captions():
    """``captions="mixed"`` (``--data shapes-mixed``): the same scenes, each caption either the language's own
    caption for that scene or the scene's full template caption, about half of each."""
    from lcmserve.distill.data import open_source

    scenes, language, images = batch_for_step(0, "test", 5, 200)
    same, mixed, same_images = batch_for_step(0, "test", 5, 200, captions="mixed")
    assert same == scenes and (same_images == images).all()
    kept = [m == t for m, t in zip(mixed, language)]
    for scene, text, keep in zip(scenes, mixed, kept):
        if not keep:
            assert parse_caption(text) == scene
    assert 0.35 < 1 - sum(kept) / len(kept) < 0.65
    assert open_source("shapes-mixed", 0, 4).fingerprint()["captions"] == "mixed"
