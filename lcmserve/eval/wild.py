"""The "wild" prompts: a second grammar, written apart from the training language, that training never sees.

It asks for the same scenes in other words and structures: other requests ("could you create",
"i need"), parentheses ("a box (red, small)"), "-coloured" / "-sized" compounds, counts such as "a
couple of", verbs of placement ("placed in the lower right"), "canvas" and "backdrop", "&" and "as
well as". Words outside the domain tokenizer's vocabulary appear as people would use them. The
prompts are kept fixed in ``prompts/wild.jsonl`` (``write_wild``; a test checks the file matches),
each with the spec of what it states and the scene it was written from (for the FID reference).
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from lcmserve.shapes.language import (
    BACKGROUND_WORDS, COLOUR_WORDS, COLUMN_WORDS, MIDDLE_WORDS, PLURAL, ROW_WORDS, SHAPE_NOUNS, SIZE_WORDS,
    ObjectSpec, Spec,
)
from lcmserve.shapes.scenes import Scene, scene_for_index

WILD_SEED = 424242
WILD_COUNT = 400
_REQUESTS = ("could you create", "i need", "can i get", "generate an image showing", "picture this:",
             "make me a picture with", "how about", "i'd love", "render an image containing", "create",
             "an illustration of", "sketch", "quick one:", "", "", "")
_PLACED = ("placed", "located", "sitting", "", "", "")
_AREAS = ("", "", " area", " region", " part", " of the canvas", " of the frame")
_JOIN = (", also ", " as well as ", " together with ", " & ", " and also ", ", then ")
_BACKDROPS = ("the backdrop should be {}", "background colour {}", "set against {}", "on plain {}", "on a {} canvas",
              "{} backdrop", "everything on {}")
_COUNTS = ("two", "a couple of", "2", "a pair of", "twin")


def _cell(cell: str, rng: random.Random) -> str:
    if cell == "center":
        return rng.choice(("dead center", "middle", "centre", "center"))
    parts = cell.split()
    if len(parts) == 2:
        return f"{rng.choice(ROW_WORDS[parts[0]])}{rng.choice(('-', ' '))}{rng.choice(COLUMN_WORDS[parts[1]])}"
    word = rng.choice(ROW_WORDS.get(parts[0]) or COLUMN_WORDS[parts[0]])
    alone = (word,) if word in ("top", "bottom", "left", "right") else ()  # "in the upper" reads wrong
    return rng.choice((f"{word}-{rng.choice(MIDDLE_WORDS)}", f"{word} edge", f"{word} middle", *alone))


def _where(cell: str, rng: random.Random) -> str:
    placed = rng.choice(_PLACED)
    phrase = f"{rng.choice(('in the', 'at the', 'towards the', 'on the'))} {_cell(cell, rng)}{rng.choice(_AREAS)}"
    return f"{placed} {phrase}".strip()


def _words(obj: ObjectSpec, rng: random.Random, plural: bool = False) -> str:
    noun = rng.choice(SHAPE_NOUNS[obj.shape]) if obj.shape else rng.choice(("thing", "shape", "item"))
    if plural:
        noun = PLURAL.get(noun, noun + "s")
    colour = rng.choice(COLOUR_WORDS[obj.colour]) if obj.colour else None
    size = rng.choice(SIZE_WORDS[obj.size]) if obj.size else None
    style = rng.random()
    if style < 0.25 and (colour or size):  # "a box (red, small)"
        return f"{noun} ({', '.join(w for w in (colour, size) if w)})"
    if style < 0.45 and colour:  # "a red-coloured small box", "a big box colored red"
        if rng.random() < 0.5:
            return " ".join(w for w in (f"{colour}-coloured", size, noun) if w)
        return " ".join(w for w in (size, noun, "colored", colour) if w)
    if style < 0.55 and size:
        return " ".join(w for w in (f"{size}-sized", colour, noun) if w)
    return " ".join(w for w in (size, colour, noun) if w)


def _object(obj: ObjectSpec, rng: random.Random) -> str:
    words = _words(obj, rng)
    det = rng.choice(("a", "one", "a lone", "exactly one", "a"))
    if det == "a" and words[0] in "aeiou":
        det = "an"
    text = f"{det} {words}"
    if obj.cell is None:
        return text
    return f"{text} {_where(obj.cell, rng)}" if rng.random() < 0.7 else f"{_where(obj.cell, rng)}: {text}"


def _group(objs: tuple[ObjectSpec, ...], rng: random.Random) -> str:
    text = f"{rng.choice(_COUNTS)} {_words(objs[0], rng, plural=True)}"
    if objs[0].cell is None:
        return text
    a, b = (_cell(o.cell, rng) for o in objs)
    return f"{text}, {rng.choice(('one in the', 'one at the'))} {a} and the other {rng.choice(('in the', 'at the'))} {b}"


def _spec(scene: Scene, rng: random.Random) -> Spec:
    """What the prompt states: everything, or a subset, or a group of two alike objects."""
    if len(scene.objects) == 2 and rng.random() < 0.25:
        a, b = scene.objects
        shared = {k: getattr(a, k) for k in ("shape", "colour", "size") if getattr(a, k) == getattr(b, k)}
        cells = rng.random() < 0.5
        return Spec(tuple(ObjectSpec(**shared, cell=o.cell if cells else None) for o in scene.objects),
                    scene.background if rng.random() < 0.5 else None)
    full = rng.random() < 0.3
    keep = {"shape": 0.8, "colour": 0.8, "size": 0.5, "cell": 0.6}
    objects = tuple(ObjectSpec(**{k: getattr(o, k) if full or rng.random() < p else None for k, p in keep.items()})
                    for o in scene.objects)
    return Spec(objects, scene.background if full or rng.random() < 0.5 else None)


def wild_prompt(scene: Scene, rng: random.Random) -> tuple[str, Spec]:
    spec = _spec(scene, rng)
    objs = spec.objects
    grouped = len(objs) == 2 and objs[0].stated().keys() - {"cell"} == objs[1].stated().keys() - {"cell"} and all(
        getattr(objs[0], k) == getattr(objs[1], k) for k in ("shape", "colour", "size")) and (
        (objs[0].cell is None) == (objs[1].cell is None))
    body = _group(objs, rng) if grouped else rng.choice(_JOIN).join(_object(o, rng) for o in objs)
    if spec.background:
        bg = rng.choice(_BACKDROPS).format(rng.choice(BACKGROUND_WORDS[spec.background]))
        body = f"{body}, {bg}" if rng.random() < 0.7 else f"{bg}: {body}"
    request = rng.choice(_REQUESTS)
    text = f"{request} {body}".strip() + rng.choice(("", ".", " thanks", "!", " pls"))
    return (text[0].upper() + text[1:] if rng.random() < 0.4 else text), spec


def wild_prompts(n: int = WILD_COUNT, seed: int = WILD_SEED) -> list[dict]:
    rows = []
    for i in range(n):
        scene = scene_for_index(i, "train", seed)
        text, spec = wild_prompt(scene, random.Random(f"wild:{seed}:{i}"))
        rows.append({"prompt": text, "spec": spec.to_dict(), "scene": Spec.of_scene(scene).to_dict()})
    return rows


def wild_file() -> Path:
    return Path(str(resources.files("lcmserve.eval") / "prompts" / "wild.jsonl"))


def write_wild(path: Path | None = None) -> Path:
    path = path or wild_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in wild_prompts()))
    return path


def load_wild(path: Path | None = None) -> list[tuple[str, Spec, Scene]]:
    """(prompt, what it states, the scene it was written from) per line of the fixed file."""
    from lcmserve.shapes.scenes import ShapeObject

    out = []
    for line in (path or wild_file()).read_text().splitlines():
        row = json.loads(line)
        scene = Scene(row["scene"]["background"], tuple(ShapeObject(**o) for o in row["scene"]["objects"]))
        out.append((row["prompt"], Spec.from_dict(row["spec"]), scene))
    return out
