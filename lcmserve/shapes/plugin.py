"""What the shapes domain lends the layers below it: its bundled model names, what their prompts look like,
and its data source.

Declared in pyproject.toml as the entry point ``shapes`` of the group ``lcmserve.plugins``;
``lcmserve.models.registry`` calls ``register`` on its first lookup.
"""

from __future__ import annotations

from functools import partial

from lcmserve.models.registry import (PromptGuide, register_bundled, register_caption_rewrite, register_data_source,
                                     register_prompt_guide, register_served_adapter)
from lcmserve.shapes import bundle
from lcmserve.shapes.data import open_distill_source
from lcmserve.shapes.language import ObjectSpec, Spec, shift_colours
from lcmserve.shapes.scenes import BACKGROUNDS, COLOURS, SHAPES

# What the bundled models were trained to read: the caption language of shapes/language.py.
PROMPT_GUIDE = PromptGuide(
    understands=(
        f"One or two shapes ({', '.join(SHAPES)}) in {', '.join(COLOURS)}, small or large, each in a cell of a "
        f"3x3 grid, on a {', '.join(BACKGROUNDS)} background. Write it as you would: name any of these and the "
        "rest is left to chance, in any order, with synonyms (big, tiny, box, dot, grey, centre, upper left, "
        "top-right corner, ...), counts ('two red squares') and requests ('please draw ...'). Naming where each "
        "shape goes draws most reliably: a shape without a place is sometimes drawn twice, most often beside "
        "a second shape. Three or more objects, other shapes, colours or places are outside what it knows."),
    # each drawn right on most seeds (tests/shapes/test_examples.py); the first is the playground's default
    examples=(
        "a red circle in the top left",
        "Please draw two small yellow triangles, one at the top left and one at the bottom right, on white",
        "a big blue square in the center, black background",
        "a big green diamond in the bottom-right corner and a small orange circle in the top-left corner",
        "show me a tiny purple dot on grey",
        "a large red circle at the top left on a white background",
    ),
)


def _one(background=None, **obj) -> Spec:
    return Spec((ObjectSpec(**obj),), background)


# Every example prompt shown anywhere (README, guides, playground, OpenAPI) with what it states:
# tests/shapes/test_examples.py generates each with the bundled model and judges it.
EXAMPLES = {
    "a red circle in the top left": _one(shape="circle", colour="red", cell="top left"),
    "Please draw two small yellow triangles, one at the top left and one at the bottom right, on white":
        Spec((ObjectSpec("triangle", "yellow", "small", "top left"),
              ObjectSpec("triangle", "yellow", "small", "bottom right")), "white"),
    "a big blue square in the center, black background":
        _one("black", shape="square", colour="blue", size="large", cell="center"),
    "a big green diamond in the bottom-right corner and a small orange circle in the top-left corner":
        Spec((ObjectSpec("diamond", "green", "large", "bottom right"),
              ObjectSpec("circle", "orange", "small", "top left"))),
    "show me a tiny purple dot on grey": _one("gray", shape="circle", colour="purple", size="small"),
    "a large red circle at the top left on a white background":
        _one("white", shape="circle", colour="red", size="large", cell="top left"),
    "a small blue square at the bottom right on a black background":
        _one("black", shape="square", colour="blue", size="small", cell="bottom right"),
    "a red circle": _one(shape="circle", colour="red"),
    "a large blue square in the center on a black background":
        _one("black", shape="square", colour="blue", size="large", cell="center"),
    "a small purple circle in the middle on a white background":
        _one("white", shape="circle", colour="purple", size="small", cell="center"),
    "a blue square": _one(shape="square", colour="blue"),
}


def register() -> None:
    for name in (bundle.LCM, bundle.TEACHER):
        register_bundled(name, partial(bundle.bundled, name))
    for name in (bundle.LORA, bundle.SHIFTED):
        register_bundled(name, partial(bundle.bundled, name), kind="lora")
    register_served_adapter(bundle.LCM, "shifted", bundle.SHIFTED)
    for name in (bundle.LCM, bundle.TEACHER):  # the teacher (with its LCM-LoRA) learnt the same captions
        register_prompt_guide(name, PROMPT_GUIDE)
    register_data_source("shapes", open_distill_source)
    register_data_source("shapes-shifted", partial(open_distill_source, style="shifted"))
    register_data_source("shapes-template", partial(open_distill_source, captions="template"))
    register_data_source("shapes-mixed", partial(open_distill_source, captions="mixed"))
    register_data_source("shapes-shifted-template", partial(open_distill_source, style="shifted", captions="template"))
    register_data_source("shapes-shifted-mixed", partial(open_distill_source, style="shifted", captions="mixed"))
    register_caption_rewrite("shapes-shifted", shift_colours)
