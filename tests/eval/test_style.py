"""The shifted-palette style: renders of it read as it, plain renders do not, and the data source draws it."""

import pytest

from lcmserve.eval.judge import ShapesJudge
from lcmserve.eval.metrics import spec_accuracy
from lcmserve.eval.style import style_share, styled_spec
from lcmserve.shapes.data import batch_for_step, open_distill_source, to_tensor
from lcmserve.shapes.language import ObjectSpec, Spec
from lcmserve.shapes.scenes import SHIFTED, render, scene_for_index, styled


def test_renders_of_each_style_read_as_that_style():
    judge = ShapesJudge()
    scenes = [scene_for_index(i, "heldout", 5) for i in range(200)]
    specs = [Spec.of_scene(s) for s in scenes]
    plain, shifted = (judge.read(to_tensor([render(s, style=style) for s in scenes])) for style in ("plain", "shifted"))
    assert style_share(shifted, specs, "shifted") > 0.97 and style_share(plain, specs, "shifted") < 0.03
    # the scene stays readable in the style: judged against what the style draws, as plain renders are
    assert spec_accuracy(shifted, [styled_spec(s, "shifted") for s in specs])["accuracy"] > 0.95


def test_the_shift_is_a_cycle_of_the_palette_and_leaves_the_rest():
    assert sorted(SHIFTED) == sorted(SHIFTED.values()) and all(k != v for k, v in SHIFTED.items())
    scene = scene_for_index(4, "train", 0)
    drawn = styled(scene, "shifted")
    assert [(o.shape, o.size, o.cell) for o in drawn.objects] == [(o.shape, o.size, o.cell) for o in scene.objects]
    assert [o.colour for o in drawn.objects] == [SHIFTED[o.colour] for o in scene.objects]
    spec = Spec((ObjectSpec(shape="circle"), ObjectSpec(colour="red")), "white")
    assert styled_spec(spec, "shifted") == Spec((ObjectSpec(shape="circle"), ObjectSpec(colour="orange")), "white")
    assert style_share([("white", {"top": ("circle", "red", "small")})], [Spec((ObjectSpec(shape="circle"),))],
                       "shifted") is None  # no colour stated: the style cannot show
    with pytest.raises(ValueError, match="style: 'ink' is not one of plain, shifted"):
        render(scene, style="ink")


def test_the_shifted_data_holds_the_same_scenes_and_captions_in_the_style():
    scenes, captions, plain = batch_for_step(3, "distill-set", 0, 16)
    scenes2, captions2, shifted = batch_for_step(3, "distill-set", 0, 16, style="shifted")
    assert scenes == scenes2 and captions == captions2 and not plain.equal(shifted)
    assert open_distill_source(3, 8, style="shifted").fingerprint()["style"] == "shifted"
    assert "style" not in open_distill_source(3, 8).fingerprint()

    from lcmserve.models.registry import data_source_names

    assert {"shapes", "shapes-shifted"} <= set(data_source_names())
