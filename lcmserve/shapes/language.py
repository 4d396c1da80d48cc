"""How people write about shapes scenes: the training caption language, and what a prompt states.

``describe(scene, rng)`` writes one caption of a scene the way a person might ask for it: any
subset of the attributes (the rest of the scene is whatever the scene prior drew, which is what an
underspecified prompt asks for), free word and attribute order, synonyms, hyphens, punctuation,
case, requests and filler ("please draw", "show me"), counts and plurals ("two red squares", "a
pair of", "circles"). It returns the ``Spec`` of what the caption states, so a judge scores only
those attributes. One caption in four is still the full template caption of ``scenes.caption``.

A ``Spec`` is a background (or None) and one ``ObjectSpec`` per object, each attribute a value or
None. ``Spec.judge`` compares it with what the classifier read from an image: the object count
must match, and some one-to-one pairing of read objects with stated ones must agree on every
stated attribute.

The language is one seeded generator (``caption_for``): the same (seed, split, index) gives the
same caption on every machine. docs/shapes.md describes it. A second grammar, which training never
sees, writes the "wild" evaluation prompts (lcmserve/eval/wild.py).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from itertools import permutations

from lcmserve.shapes.scenes import (BACKGROUNDS, CELLS, COLOURS, SHAPES, SHIFTED, SIZES, Scene, caption,
                                    scene_for_index)

ATTRIBUTES = ("shape", "colour", "size", "cell")

SHAPE_NOUNS = {"circle": ("circle", "disk", "disc", "dot"), "square": ("square", "box"),
               "triangle": ("triangle",), "diamond": ("diamond", "rhombus")}
PLURAL = {"box": "boxes", "rhombus": "rhombuses", "shape": "shapes", "object": "objects"}
GENERIC_NOUNS = ("shape", "object", "thing", "item", "figure")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
BACKGROUND_WORDS = {"black": ("black", "dark"), "white": ("white",), "gray": ("gray", "grey")}
ROW_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
COLUMN_WORDS = {"left": ("left",), "right": ("right",)}
MIDDLE_WORDS = ("middle", "center", "centre")
COUNT_WORDS = ("two", "2", "a pair of", "a couple of", "twin", "")  # "": a bare plural ("red circles") means two
ONE_WORDS = ("one", "a single", "just one", "only one", "exactly one", "a lone", "one single")
REQUESTS = ("please draw", "draw", "draw me", "an image of", "a picture of", "a drawing of", "show me", "i want",
            "i would like", "can you draw", "could you draw", "make", "generate", "render", "paint", "give me",
            "a scene with", "an image with", "there is", "just", "create", "sketch", "i need", "can i get",
            "could you make", "make me", "an illustration of", "a picture showing", "an image showing",
            "an image containing", "a picture containing", "how about", "i'd love", "i'd like", "depict", "produce",
            "quick one:", "picture this:", "let's see", "i'm looking for", "we need", "show", "imagine")
# closing words people add; they carry nothing about the scene
ENDINGS = ("", "", "", ".", "!", "?", ", please", " please", " thanks", ", thank you", " pls", " plz", " :)", " now")
PLACED = ("placed", "located", "sitting", "positioned", "set", "lying", "that sits", "standing")
AREAS = (" area", " region", " part", " of the image", " of the picture", " of the canvas", " of the frame",
         " of the scene")
_JOINERS = (" and ", " and ", " and ", ", ", ", and ", " with ", " plus ", "; ", " as well as ", " together with ",
            ", also ", " and also ", " & ", ", then ", " and next to it ")
_BACKGROUNDS_AFTER = ("on a {} background", "against a {} background", "with a {} background", "on {}",
                      "{} background", "background: {}", "the background is {}", "on a {} backdrop",
                      "on plain {}", "on a plain {} background", "background colour {}", "background color {}",
                      "the background should be {}", "set against {}", "everything on {}", "on a {} canvas",
                      "{} backdrop", "the backdrop is {}", "with everything else {}")
_BACKGROUNDS_BEFORE = ("{} background", "on a {} background", "on {}", "background {}", "on plain {}",
                       "background colour {}", "{} backdrop", "everything on {}")


# A new word's first embedding when a trained text encoder moves onto this vocabulary: a word it already knew.
ALIASES = {w: group[0] for table in (SHAPE_NOUNS, SIZE_WORDS, COLOUR_WORDS, BACKGROUND_WORDS, ROW_WORDS)
           for group in table.values() for w in group[1:]} | {"centre": "center", "shape": "circle"}
ALIASES |= {PLURAL.get(w, w + "s"): ALIASES.get(w, w) for nouns in SHAPE_NOUNS.values() for w in nouns}
ALIASES |= {"thing": "shape", "item": "shape", "figure": "shape", "things": "shapes", "items": "shapes",
            "figures": "shapes", "colored": "coloured", "plz": "pls", "towards": "to"}


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt says about one object; None where it says nothing."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    cell: str | None = None

    def stated(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


@dataclass(frozen=True)
class Spec:
    """What a prompt states about a scene: its objects (the count is their number) and maybe the background."""

    objects: tuple[ObjectSpec, ...]
    background: str | None = None

    @classmethod
    def of_scene(cls, scene: Scene) -> Spec:
        return cls(tuple(ObjectSpec(o.shape, o.colour, o.size, o.cell) for o in scene.objects), scene.background)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.stated() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Spec:
        return cls(tuple(ObjectSpec(**o) for o in data["objects"]), data.get("background"))

    def judge(self, read: tuple[str, dict]) -> dict[str, bool | None]:
        """Score what the classifier read, ``(background, {cell: (shape, colour, size)})``, against the spec.

        ``exact``: the count is right, some pairing of read and stated objects agrees on every stated
        attribute, and the background is right if stated. Per attribute (None where nothing states it):
        the count is right and some pairing agrees on that attribute alone.
        """
        background, cells = read
        found = [dict(shape=s, colour=c, size=z, cell=cell) for cell, (s, c, z) in cells.items()]
        count = len(found) == len(self.objects)

        def pairs(attrs) -> bool:
            return count and any(
                all(getattr(want, a) in (None, got[a]) for want, got in zip(self.objects, order) for a in attrs)
                for order in permutations(found)
            )

        result: dict[str, bool | None] = {"count": count}
        for a in ATTRIBUTES:
            result[a] = pairs((a,)) if any(getattr(o, a) for o in self.objects) else None
        result["background"] = None if self.background is None else background == self.background
        result["exact"] = pairs(ATTRIBUTES) and result["background"] is not False
        return result


# -- the generator ------------------------------------------------------------------------------------------
def _cell_words(cell: str, rng: random.Random) -> str:
    """The name of a cell: "top left", "upper-left", "top left corner", "centre", "middle right", ..."""
    if cell == "center":
        return rng.choice(MIDDLE_WORDS + ("very center", "middle of the image"))
    parts = cell.split()
    if len(parts) == 2:  # a corner
        words = f"{rng.choice(ROW_WORDS[parts[0]])}{rng.choice((' ', ' ', '-'))}{rng.choice(COLUMN_WORDS[parts[1]])}"
        return rng.choice((words, words, f"{words} corner"))
    edge = parts[0]  # top, bottom, left or right: the middle cell of that edge
    word, middle = rng.choice(ROW_WORDS.get(edge) or COLUMN_WORDS[edge]), rng.choice(MIDDLE_WORDS)
    if edge in COLUMN_WORDS:
        return rng.choice((word, word, f"{middle} {word}", f"{word} side", f"{word} {middle}"))
    return rng.choice((word, word, f"{word} {middle}", f"{word} edge"))


def _position(cell: str, rng: random.Random, bare: bool = True, placed: bool = True) -> str:
    words = _cell_words(cell, rng)
    if rng.random() < 0.2 and not words.endswith(("corner", "side", "edge", "image")):
        words += rng.choice(AREAS)
    where = rng.choice((f"at the {words}", f"in the {words}", f"on the {words}", f"at the {words}", f"towards the {words}")
                       + ((words,) if bare else ()))
    if placed and rng.random() < 0.2 and where != words:
        where = f"{rng.choice(PLACED)} {where}"
    return where


def _noun(obj: ObjectSpec, rng: random.Random, plural: bool = False) -> str:
    word = rng.choice(SHAPE_NOUNS[obj.shape]) if obj.shape else rng.choice(GENERIC_NOUNS)
    return PLURAL.get(word, word + "s") if plural else word


def _adjectives(obj: ObjectSpec, rng: random.Random) -> list[str]:
    size = rng.choice(SIZE_WORDS[obj.size]) if obj.size else None
    colour = rng.choice(COLOUR_WORDS[obj.colour]) if obj.colour else None
    if size and rng.random() < 0.1:
        size += "-sized"
    if colour and rng.random() < 0.1:
        colour += rng.choice(("-coloured", "-colored", " coloured", " colored"))
    words = [size, colour]
    if rng.random() < 0.2:
        words.reverse()
    return [w for w in words if w]


def _article(next_word: str, rng: random.Random) -> str:
    return rng.choice(ONE_WORDS) if rng.random() < 0.15 else ("an" if next_word[0] in "aeiou" else "a")


def _object_phrase(obj: ObjectSpec, rng: random.Random) -> str:
    """One object, its position before or after it, or none when the cell is not stated."""
    noun, adjectives = _noun(obj, rng), _adjectives(obj, rng)
    form = rng.random()
    if adjectives and form < 0.12:  # "a circle that is small and red"
        core = f"{_article(noun, rng)} {noun} {rng.choice(('that is', 'which is', 'in'))} {' and '.join(adjectives)}"
    elif obj.colour and form < 0.2:  # "a small circle coloured red", "a circle in red"
        size = [rng.choice(SIZE_WORDS[obj.size])] if obj.size else []
        colour = f"{rng.choice(('coloured', 'colored', 'in', 'painted', 'in the colour'))} {rng.choice(COLOUR_WORDS[obj.colour])}"
        core = " ".join([_article((size or [noun])[0], rng), *size, noun, colour])
    elif rng.random() < 0.08:  # no article: "red circle top left"
        core = " ".join([*adjectives, noun])
    else:
        core = " ".join([_article((adjectives or [noun])[0], rng), *adjectives, noun])
    if obj.cell is None:
        return core
    if rng.random() < 0.25:
        where = _position(obj.cell, rng, bare=False, placed=False)
        return rng.choice((f"{where}, {core}", f"{where} {core}", f"{where}: {core}", f"{where} there is {core}"))
    return f"{core} {_position(obj.cell, rng)}"


def _group_phrase(objs: tuple[ObjectSpec, ObjectSpec], rng: random.Random) -> str:
    """Two objects stated alike: "two small red squares, one at the top left and one in the center"."""
    first = objs[0]
    count = rng.choice(COUNT_WORDS)
    core = " ".join(w for w in (count, *_adjectives(first, rng), _noun(first, rng, plural=True)) if w)
    if first.cell is None:
        return core
    a, b = (_position(o.cell, rng, placed=False) for o in objs)
    return rng.choice((f"{core}, one {a} and one {b}", f"{core} {a} and {b}", f"{core}: {a} and {b}",
                       f"{core}, one {a} and the other {b}", f"{core}, the first {a}, the second {b}"))


def _background_phrase(bg: str, rng: random.Random, before: bool) -> str:
    return rng.choice(_BACKGROUNDS_BEFORE if before else _BACKGROUNDS_AFTER).format(rng.choice(BACKGROUND_WORDS[bg]))


NOISE_MARKS = ("(", ")", "-", ":", ";", "\"", "'", "/", "...", "*")


def _noise_word(rng: random.Random) -> str:
    """A made-up word: teaches the model that words it does not know carry nothing."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def _state(scene: Scene, rng: random.Random) -> Spec:
    """Which attributes the caption states: all of them, or a random subset (the rest comes from the prior)."""
    if rng.random() < 0.35:
        return Spec.of_scene(scene)
    keep = {"shape": 0.85, "colour": 0.75, "size": 0.45, "cell": 0.55}
    objects = tuple(ObjectSpec(**{a: getattr(o, a) if rng.random() < keep[a] else None for a in ATTRIBUTES})
                    for o in scene.objects)
    return Spec(objects, scene.background if rng.random() < 0.45 else None)


def _group(spec: Spec, scene: Scene, rng: random.Random) -> Spec | None:
    """The same scene stated as a plural group ("two red circles"): only attributes both objects share
    (often none but the count), cells for both or for neither."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    alike = [k for k in ("shape", "colour", "size") if getattr(a, k) == getattr(b, k)]
    if rng.random() >= (0.6 if "shape" in alike else 0.2):
        return None
    shared = {k: getattr(a, k) for k in alike if rng.random() < 0.9}
    cells = rng.random() < 0.5
    objects = tuple(ObjectSpec(**shared, cell=o.cell if cells else None) for o in scene.objects)
    return Spec(objects, spec.background)


def _surface(text: str, rng: random.Random) -> str:
    """Requests, filler, punctuation and case around the description."""
    if rng.random() < 0.45:
        text = f"{rng.choice(REQUESTS)} {text}"
    if rng.random() < 0.35:  # words and marks the model does not know, anywhere: they must not change the scene
        words = text.split(" ")
        for _ in range(rng.randint(1, 3)):
            noise = _noise_word(rng) if rng.random() < 0.7 else rng.choice(NOISE_MARKS)
            words.insert(rng.randrange(len(words) + 1), noise)
        text = " ".join(words)
    text += rng.choice(ENDINGS)
    case = rng.random()
    if case < 0.3:
        text = text[0].upper() + text[1:]
    elif case < 0.35:
        text = text.upper()
    elif case < 0.4:
        text = text.title()
    return text


def describe(scene: Scene, rng: random.Random, spec: Spec | None = None) -> tuple[str, Spec]:
    """A caption of ``scene`` as a person might write it, and the spec of what it states. ``spec``: state
    exactly that (the scene's values, or None per attribute) with one phrase per object, instead of a
    random choice of what to state."""
    grouped = None
    if spec is None:
        if rng.random() < 0.25:  # the full template caption, maybe inside a request
            return _surface(caption(scene, rng), rng), Spec.of_scene(scene)
        spec = _state(scene, rng)
        grouped = _group(spec, scene, rng)
    if grouped is not None:
        spec = grouped
        body = _group_phrase(spec.objects, rng)
    else:
        phrases = [_object_phrase(o, rng) for o in spec.objects]
        if rng.random() < 0.5:
            phrases.reverse()
        body = rng.choice(_JOINERS).join(phrases)
    if spec.background is not None:
        before = rng.random() < 0.25
        bg = _background_phrase(spec.background, rng, before)
        body = f"{bg}, {body}" if before else f"{body}{rng.choice((' ', ', ', ' ', '; '))}{bg}"
    return _surface(body, rng), spec


def unplaced_spec(scene: Scene, rng: random.Random) -> Spec:
    """What a caption of a two-object scene states when it leaves out where at least one object goes: a
    random choice of the other attributes, as ``describe`` makes, and the place of one object (two in
    three) or of neither. The models find these prompts the hardest: the unplaced object must still be
    drawn once, somewhere else, and keep its own attributes."""
    if len(scene.objects) != 2:
        raise ValueError(f"unplaced_spec: a two-object scene is needed, this one has {len(scene.objects)}")
    spec = _state(scene, rng)
    placed = rng.choice((0, 0, 1, 1, None, None))  # None: neither object is placed
    objects = tuple(ObjectSpec(o.shape, o.colour, o.size, scene.objects[i].cell if i == placed else None)
                    for i, o in enumerate(spec.objects))
    return Spec(objects, spec.background)


_COLOUR_WORD = re.compile(r"\b(?:(an?) )?(" + "|".join(w for ws in COLOUR_WORDS.values() for w in ws) + r")\b",
                          re.IGNORECASE)
_COLOUR_OF = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}


def shift_colours(text: str) -> str:
    """``text`` about the scene the shifted style draws for it: each colour word one hue step on
    (scenes.SHIFTED: red -> orange, ..., purple -> red), in the same case, with "a" and "an" before it
    following the new word. The style adapter is distilled to draw for a prompt what the LCM draws for
    this rewrite of it."""
    def cased(new: str, old: str) -> str:
        return new.upper() if old.isupper() and len(old) > 1 else new.capitalize() if old[0].isupper() else new

    def shifted(match: re.Match) -> str:
        article, word = match.groups()
        new = cased(COLOUR_WORDS[SHIFTED[_COLOUR_OF[word.lower()]]][0], word)
        if article is None:
            return new
        return cased("an" if new[0].lower() in "aeiou" else "a", article) + " " + new

    return _COLOUR_WORD.sub(shifted, text)


def caption_for(index: int, split: str = "train", seed: int = 0) -> tuple[Scene, str, Spec]:
    """The index-th scene of a split with a caption of the language: the same everywhere."""
    scene = scene_for_index(index, split, seed)
    text, spec = describe(scene, random.Random(f"{seed}:{split}:{index}:describe"))
    return scene, text, spec


def language_words() -> list[str]:
    """Every word the language can write (the domain tokenizer gives each one token)."""
    texts = [*MIDDLE_WORDS, *PLURAL.values(), *GENERIC_NOUNS, *COUNT_WORDS, *ONE_WORDS, *REQUESTS, *_JOINERS,
             *_BACKGROUNDS_AFTER, *_BACKGROUNDS_BEFORE, *SHAPES, *SIZES, *BACKGROUNDS, *CELLS, *ENDINGS, *PLACED,
             *AREAS, "coloured colored painted colour sized towards other first second",
             *(n + "s" for ns in (*SHAPE_NOUNS.values(), GENERIC_NOUNS) for n in ns if n not in PLURAL),
             "at in on the corner side edge very of image an one a single that is which there please background"]
    for table in (SHAPE_NOUNS, SIZE_WORDS, COLOUR_WORDS, BACKGROUND_WORDS, ROW_WORDS, COLUMN_WORDS):
        for words in table.values():
            texts.extend(words)
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.replace("{}", " "))})
