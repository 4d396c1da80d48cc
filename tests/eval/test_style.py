"""Reading the outline style: every outlined render reads outlined, no plain one does, on every background."""

import pytest

from lcmserve.eval.style import outline_share, reads_outlined
from lcmserve.shapes.data import batch_for_step, open_distill_source, to_tensor
from lcmserve.shapes.scenes import BACKGROUNDS, render, scene_for_index


def test_the_style_is_read_from_renders_of_both_styles():
    scenes = [scene_for_index(i, "heldout", 5) for i in range(300)]
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    backgrounds = [s.background for s in scenes]
    assert not any(reads_outlined(to_tensor([render(s) for s in scenes]), backgrounds))
    outlined = to_tensor([render(s, style="outline") for s in scenes])
    assert all(reads_outlined(outlined, backgrounds))
    shares = outline_share(outlined, backgrounds)
    assert shares.min() > 0.008 and shares.max() < 0.1  # a stroke, not a fill


def test_the_outline_data_holds_the_same_scenes_and_captions_drawn_outlined():
    scenes, captions, plain = batch_for_step(3, "distill-set", 0, 16)
    scenes2, captions2, outlined = batch_for_step(3, "distill-set", 0, 16, style="outline")
    assert scenes == scenes2 and captions == captions2 and not plain.equal(outlined)
    source = open_distill_source(3, 8, style="outline")
    assert source.fingerprint()["style"] == "outline" and "style" not in open_distill_source(3, 8).fingerprint()
    with pytest.raises(ValueError, match="style: 'ink' is not one of plain, outline"):
        render(scenes[0], style="ink")


def test_the_outline_source_is_a_distill_data_name():
    from lcmserve.models.registry import data_source_names

    assert {"shapes", "shapes-outline"} <= set(data_source_names())
