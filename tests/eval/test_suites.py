"""The prompt suites of `lcmserve eval`, the wild prompts' file, and scoring by what prompts state."""

import pytest

from lcmserve.errors import InvalidInputError
from lcmserve.eval.judge import scene_key
from lcmserve.eval.metrics import spec_accuracy
from lcmserve.eval.suites import SUITES, suite_prompts
from lcmserve.eval.wild import WILD_COUNT, load_wild, wild_file, wild_prompts


def test_the_wild_file_is_what_its_grammar_writes():
    lines = wild_file().read_text().splitlines()
    import json

    assert [json.loads(line) for line in lines] == wild_prompts()
    assert len(lines) == WILD_COUNT


def test_wild_prompts_are_true_of_their_scenes_and_not_training_captions():
    from lcmserve.shapes.language import caption_for

    rows = load_wild()
    assert all(spec.judge(scene_key(scene))["exact"] for _, spec, scene in rows)
    training = {caption_for(i, "train", s)[1].lower() for s in range(2) for i in range(2000)}
    assert not any(text.lower() in training for text, _, _ in rows)
    assert sum(spec.background is None for _, spec, _ in rows) > 50 and sum(len(s.objects) == 2 for _, s, _ in rows) > 100


@pytest.mark.parametrize("suite", SUITES)
def test_each_suite_gives_prompts_its_scenes_satisfy(suite):
    prompts = suite_prompts(suite, 50, 1000)
    assert len(prompts) == 50 and len({p.text for p in prompts}) > 40
    assert all(p.spec.judge(scene_key(p.scene))["exact"] for p in prompts)
    if suite in ("template", "heldout"):
        assert all(all(len(o.stated()) == 4 for o in p.spec.objects) and p.spec.background for p in prompts)
    if suite == "heldout":
        assert all(p.scene.split == "heldout" for p in prompts)


def test_unknown_suite_is_refused():
    with pytest.raises(InvalidInputError, match="suite"):
        suite_prompts("poetry", 3, 0)


def test_spec_accuracy_averages_the_parts_over_the_prompts_that_state_them():
    prompts = suite_prompts("wild", 40, 0)
    right = [scene_key(p.scene) for p in prompts]
    acc = spec_accuracy(right, [p.spec for p in prompts])
    assert acc["accuracy"] == 1.0 and acc["count"] == 1.0 and all(v in (None, 1.0) for v in acc.values())
    empty = [("black", {}) for _ in prompts]
    none = spec_accuracy(empty, [p.spec for p in prompts])
    assert none["accuracy"] == 0.0 and none["count"] == 0.0
    with pytest.raises(ValueError):
        spec_accuracy(right[:3], [p.spec for p in prompts])
