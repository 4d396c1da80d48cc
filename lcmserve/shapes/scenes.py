"""Captioned scenes of coloured shapes on a 3x3 grid: the bundled text-to-image domain.

A scene is a background colour and one or two objects, each with a shape, a colour, a size
and a cell of the 3x3 grid. Scenes are drawn from a seed, rendered at 64x64 with PIL
(4x supersampled, so edges are anti-aliased), and captioned from several templates with
synonyms. Every caption names every attribute, so the scene can be read back from the
caption (``parse_caption``) and attribute accuracy is exact. A fixed set of
(shape, colour, cell) triples never appears in training scenes: the held-out split.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"black": (18, 18, 18), "white": (238, 238, 238), "gray": (120, 120, 120)}
SIZES = {"small": 0.5, "large": 0.88}  # side of the shape's box, as a fraction of a cell
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SPLITS = ("train", "heldout")
# How scenes are drawn: as stated (plain), or with the palette shifted one hue step (shifted: red is drawn
# orange, orange yellow, ..., purple red), the style the bundled style adapter learns. A style is a change of
# the scene drawn, not of the drawing: the VAE, which has only seen plain renders, reproduces it, and the judge
# reads it (eval/style.py).
STYLES = ("plain", "shifted")
SHIFTED = {"red": "orange", "orange": "yellow", "yellow": "green", "green": "blue", "blue": "purple",
           "purple": "red"}


_SHAPE_WORDS = {"circle": ("circle", "disk"), "square": ("square",), "triangle": ("triangle",),
                "diamond": ("diamond", "rhombus")}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_CELL_PHRASES = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "at the middle left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the middle right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
_BACKGROUND_PHRASES = ("on a {bg} background", "against a {bg} background", "with a {bg} background")
_TEMPLATES = ("{objects} {background}", "a picture of {objects} {background}", "{objects}, {background}")


@dataclass(frozen=True, order=True)
class ShapeObject:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    cell: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                     ("size", self.size, tuple(SIZES)), ("cell", self.cell, CELLS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.cell)


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects in distinct cells, kept in cell order."""

    background: str
    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}; got {self.background!r}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects; got {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must be in distinct cells; got {cells}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: CELLS.index(o.cell))))

    @property
    def split(self) -> str:
        return "heldout" if any(is_heldout(o.triple) for o in self.objects) else "train"


@lru_cache(maxsize=None)
def is_heldout(triple: tuple[str, str, str]) -> bool:
    """About one (shape, colour, cell) triple in seven is held out of training, fixed by a hash."""
    digest = hashlib.sha256("|".join(triple).encode()).digest()
    return digest[0] % 7 == 0


def heldout_triples() -> list[tuple[str, str, str]]:
    return [(s, c, p) for s in SHAPES for c in COLOURS for p in CELLS if is_heldout((s, c, p))]


def sample_scene(rng: random.Random, split: str = "train", max_objects: int = 2) -> Scene:
    """A random scene of the split: train scenes hold no held-out triple, held-out ones at least one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    while True:
        n = rng.randint(1, max_objects)
        cells = rng.sample(CELLS, n)
        objects = tuple(
            ShapeObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES)), cell)
            for cell in cells
        )
        scene = Scene(rng.choice(tuple(BACKGROUNDS)), objects)
        if scene.split == split:
            return scene


def scene_for_index(index: int, split: str = "train", seed: int = 0, max_objects: int = 2) -> Scene:
    """The index-th scene of a split: the same on every machine and in every process."""
    return sample_scene(random.Random(f"{seed}:{split}:{index}"), split, max_objects)


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming every attribute of the scene, from a random template and synonyms."""
    phrases = []
    for obj in scene.objects:
        size = rng.choice(_SIZE_WORDS[obj.size])
        shape = rng.choice(_SHAPE_WORDS[obj.shape])
        phrases.append(f"a {size} {obj.colour} {shape} {rng.choice(_CELL_PHRASES[obj.cell])}")
    if len(phrases) == 2 and rng.random() < 0.5:
        phrases.reverse()
    background = rng.choice(_BACKGROUND_PHRASES).format(bg=scene.background)
    return rng.choice(_TEMPLATES).format(objects=" and ".join(phrases), background=background)


def caption_for_index(index: int, split: str = "train", seed: int = 0) -> tuple[Scene, str]:
    scene = scene_for_index(index, split, seed)
    return scene, caption(scene, random.Random(f"{seed}:{split}:{index}:caption"))


def _shape_points(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    raise ValueError(shape)


def styled(scene: Scene, style: str) -> Scene:
    """The scene as ``style`` draws it."""
    if style not in STYLES:
        raise ValueError(f"style: {style!r} is not one of {', '.join(STYLES)}")
    if style == "plain":
        return scene
    return Scene(scene.background, tuple(ShapeObject(o.shape, SHIFTED[o.colour], o.size, o.cell)
                                         for o in scene.objects))


def render(scene: Scene, size: int = IMAGE_SIZE, style: str = "plain") -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels, in one of ``STYLES``."""
    scene = styled(scene, style)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for obj in scene.objects:
        index = CELLS.index(obj.cell)
        cx, cy = (index % 3 + 0.5) * cell, (index // 3 + 0.5) * cell
        half = SIZES[obj.size] * cell / 2
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, half), fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


def vocabulary() -> list[str]:
    """Every word a caption can use (for the domain tokenizer)."""
    texts = [*_TEMPLATES, *_BACKGROUND_PHRASES, *BACKGROUNDS, *COLOURS, "and"]
    for words in (*_SHAPE_WORDS.values(), *_SIZE_WORDS.values(), *_CELL_PHRASES.values()):
        texts.extend(words)
    texts = [re.sub(r"\{\w+\}", " ", t) for t in texts]  # drop template slots
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t)})


_SYNONYM_TO = {
    **{w: s for s, ws in _SHAPE_WORDS.items() for w in ws},
}
_OBJECT_RE = re.compile(
    r"an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<where>(?:at|in|on) the [a-z ]+?)(?= and |,| on | against | with |$)"
)
_BG_RE = re.compile(r"(?:on|against|with) a (?P<bg>\w+) background")


def parse_caption(text: str) -> Scene:
    """Read a caption of ours back into its scene (raises ValueError for anything else)."""
    text = text.strip().lower()
    bg = _BG_RE.search(text)
    if not bg:
        raise ValueError(f"no background phrase in {text!r}")
    size_of = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
    cell_of = {p: c for c, ps in _CELL_PHRASES.items() for p in ps}
    objects = []
    for m in _OBJECT_RE.finditer(text[: bg.start()]):
        where = m.group("where").strip()
        if where not in cell_of or m.group("size") not in size_of or m.group("shape") not in _SYNONYM_TO:
            raise ValueError(f"cannot read object {m.group(0)!r} in {text!r}")
        objects.append(ShapeObject(_SYNONYM_TO[m.group("shape")], m.group("colour"), size_of[m.group("size")],
                                   cell_of[where]))
    if not objects:
        raise ValueError(f"no object in {text!r}")
    return Scene(bg.group("bg"), tuple(objects))
