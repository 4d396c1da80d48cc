"""The caption language: what it writes, what its specs state, and how a spec judges what was drawn."""

import random
import re

import pytest

from lcmserve.eval.judge import scene_key
from lcmserve.shapes.language import (ALIASES, ObjectSpec, Spec, caption_for, describe, language_words,
                                      shift_colours, unplaced_spec)
from lcmserve.shapes.scenes import Scene, ShapeObject, caption, parse_caption, scene_for_index, styled

N = 3000


@pytest.fixture(scope="module")
def captions():
    return [caption_for(i, "train", 7) for i in range(N)]


def test_the_same_index_gives_the_same_caption_everywhere():
    assert caption_for(12, "train", 3) == caption_for(12, "train", 3)
    assert caption_for(12, "train", 3) != caption_for(13, "train", 3)


def test_every_caption_states_only_what_its_scene_holds(captions):
    for scene, text, spec in captions:
        assert len(spec.objects) == len(scene.objects), text
        assert spec.judge(scene_key(scene))["exact"], (text, spec)


def test_the_language_covers_how_people_write(captions):
    texts = [t for _, t, _ in captions]
    lower = [t.lower() for t in texts]

    def share(pattern):
        return sum(bool(re.search(pattern, t)) for t in lower) / len(lower)

    for pattern in (r"\btop-left\b|\bupper-left\b", r"\btwo\b", r"\ba pair of\b", r"\b2\b", r"\bplease draw\b",
                    r"\bshow me\b", r"\bi want\b", r"\bhuge\b", r"\btiny\b", r"\bgrey\b", r"\bcentre\b", r"\bbox",
                    r"\bdots?\b", r"[.!?]$", r"\bcircles\b", r"\bexactly one\b|\ba lone\b", r"\ba couple of\b",
                    r"\bthings?\b|\bitems?\b", r"colou?red\b", r"\bplaced\b|\blocated\b|\bsitting\b", r"\bthanks\b",
                    r"\bsketch\b", r"\bthe other\b", r"\bas well as\b"):
        assert share(pattern) > 0.002, pattern
    assert sum(t.isupper() for t in texts) > 0 and sum(t[0].isupper() for t in texts) > N * 0.2
    specs = [s for _, _, s in captions]
    full = sum(all(len(o.stated()) == 4 for o in s.objects) and s.background is not None for s in specs) / N
    assert 0.4 < full < 0.7  # full descriptions stay common (the template suite), but not the only kind
    assert sum(s.background is None for s in specs) > N * 0.2
    assert sum(any(o.cell is None for o in s.objects) for s in specs) > N * 0.2
    assert sum(any(not o.stated() for o in s.objects) for s in specs) > 0  # "a shape" with nothing stated


def test_underspecified_captions_leave_the_rest_to_the_scene_prior(captions):
    """A caption that leaves an attribute out comes with scenes that vary it as the prior does."""
    unstated = {"size": set(), "cell": set(), "colour": set(), "background": set()}
    for scene, _, spec in captions:
        for want, got in zip(sorted(spec.objects, key=lambda o: o.cell or ""), scene.objects):
            if len(spec.objects) == 1:
                for key in ("size", "cell", "colour"):
                    if getattr(want, key) is None:
                        unstated[key].add(getattr(got, key))
        if spec.background is None:
            unstated["background"].add(scene.background)
    assert [len(unstated[k]) for k in ("size", "cell", "colour", "background")] == [2, 9, 6, 3]


def test_plurals_state_the_shared_attributes_of_two_objects(captions):
    plural = [(t, s) for _, t, s in captions if re.search(r"\b(two|2|a pair of|a couple of|twin)\b", t.lower())]
    assert plural
    for text, spec in plural:
        assert len(spec.objects) == 2, text
        a, b = (o.stated() for o in spec.objects)
        assert {k: v for k, v in a.items() if k != "cell"} == {k: v for k, v in b.items() if k != "cell"}, text


def test_every_word_of_the_language_is_one_token_and_captions_fit(tmp_path, captions):
    from lcmserve.shapes.models import MAX_TOKENS, write_tokenizer

    tok = write_tokenizer(tmp_path)
    assert [w for w in language_words() if len(tok.tokenize(w)) != 1] == []
    assert max(len(tok(t, verbose=False).input_ids) for _, t, _ in captions) <= MAX_TOKENS
    assert set(ALIASES) <= set(language_words())


def test_spec_judge_scores_only_what_is_stated():
    read = ("white", {"top left": ("circle", "red", "small"), "center": ("square", "blue", "large")})
    both = Spec((ObjectSpec(colour="blue"), ObjectSpec(shape="circle", cell="top left")))
    verdict = both.judge(read)
    assert verdict["exact"] and verdict["count"] and verdict["size"] is None and verdict["background"] is None
    assert not Spec((ObjectSpec(colour="red"),)).judge(read)["exact"]  # one object asked, two drawn
    assert not Spec((ObjectSpec(colour="red"), ObjectSpec(colour="red"))).judge(read)["exact"]
    swapped = Spec((ObjectSpec(shape="circle", cell="center"), ObjectSpec(shape="square", cell="top left")))
    v = swapped.judge(read)
    assert not v["exact"] and v["shape"] and v["cell"]  # each part right alone, not together
    assert not Spec((ObjectSpec(), ObjectSpec()), "black").judge(read)["exact"]
    assert Spec((ObjectSpec(), ObjectSpec()), "white").judge(read)["exact"]


def test_specs_round_trip_through_json():
    scene = scene_for_index(3, "train", 0)
    for spec in (Spec.of_scene(scene), Spec((ObjectSpec(colour="red"),)), Spec((ObjectSpec(), ObjectSpec()), "gray")):
        assert Spec.from_dict(spec.to_dict()) == spec


def test_describe_a_given_scene():
    scene = Scene("black", (ShapeObject("triangle", "green", "large", "bottom right"),))
    texts = {describe(scene, random.Random(i))[0].lower() for i in range(200)}
    assert any("triangle" in t for t in texts) and any("green" in t for t in texts)
    assert not any(re.search(rf"\b{w}\b", t) for t in texts for w in ("circle", "square", "diamond", "red", "blue",
                                                                       "white"))


def test_render_writes_language_captions_with_what_they_state(tmp_path, capsys):
    import json

    from lcmserve.cli import main

    assert main(["shapes", "render", "--captions", "language", "-n", "5", "-o", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [caption_for(i, "train", 0)[1] for i in range(5)]
    assert all(Spec.from_dict(r["states"]) == caption_for(i, "train", 0)[2] for i, r in enumerate(rows))
    assert (tmp_path / "grid.png").is_file()


def test_check_vae_refuses_what_is_not_a_vae(tmp_path, capsys):
    from lcmserve.cli import main

    assert main(["shapes", "check-vae", str(tmp_path)]) == 2
    assert "vae:" in capsys.readouterr().err
    assert main(["shapes", "check-vae", "-n", "3"]) == 2
    assert "num" in capsys.readouterr().err


def test_unplaced_captions_leave_out_where_one_or_both_of_two_objects_go(captions):
    """The hard prompts the teacher can be given more of: one object placed (about two in three) or neither."""
    cell_words = re.compile(r"\b(top|bottom|left|right|upper|lower|middle|center|centre|corner|side|edge)\b")
    two = [scene for scene, _, _ in captions if len(scene.objects) == 2][:600]
    placed = []
    for i, scene in enumerate(two):
        rng = random.Random(i)
        spec = unplaced_spec(scene, rng)
        text, stated = describe(scene, rng, spec)
        assert stated == spec and spec.judge(scene_key(scene))["exact"], (text, spec)
        cells = sum(o.cell is not None for o in spec.objects)
        assert cells < 2 and bool(cell_words.search(text.lower())) == (cells == 1), (text, spec)
        placed.append(cells)
    assert 0.55 < sum(placed) / len(placed) < 0.78
    with pytest.raises(ValueError, match="two-object"):
        unplaced_spec(Scene("black", (ShapeObject("triangle", "green", "large", "bottom right"),)), random.Random(0))


def test_shift_colours_writes_the_caption_of_the_scene_the_shifted_style_draws():
    for i in range(300):
        scene = scene_for_index(i, "train", 5)
        text = caption(scene, random.Random(i))
        assert parse_caption(shift_colours(text)) == styled(scene, "shifted"), text
    assert shift_colours("A Red circle and a violet box, PURPLE-coloured; AN ORANGE DOT") == \
        "An Orange circle and a red box, RED-coloured; A YELLOW DOT"
    assert shift_colours("an orange square, reddish, a big green diamond") == "a yellow square, reddish, a big blue diamond"
