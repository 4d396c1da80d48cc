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

# The caption template the models were trained on (scenes.caption); words outside it draw poorly.
PROMPT_GUIDE = PromptGuide(
    understands=(
        f"One or two shapes on a plain background, each as 'a <small|large> <{'|'.join(COLOURS)}> "
        f"<{'|'.join(SHAPES)}> <place>', where the place is a cell of a 3x3 grid: at the top left, at the top, "
        "at the top right, on the left, in the center, on the right, at the bottom left, at the bottom, at the "
        f"bottom right; then 'on a <{'|'.join(BACKGROUNDS)}> background'. Two shapes are joined by 'and'. "
        "Paraphrases, plurals and other words are drawn poorly."),
    # each read right by the shapes judge (lcmserve.eval) on most seeds at 4 steps; the first is the default
    examples=(
        "a large red circle at the top left on a white background",
        "a large blue square in the center on a black background",
        "a big yellow triangle at the bottom right against a gray background",
        "a small purple circle in the middle on a white background",
        "a large purple diamond on the right against a white background",
        "a large blue circle at the top left and a large yellow square at the bottom right on a black background",
    ),
)


def _one(background=None, **obj) -> Spec:
    return Spec((ObjectSpec(**obj),), background)


# Every example prompt shown anywhere (README, guides, playground, OpenAPI) with what it states:
# tests/shapes/test_examples.py generates each with the bundled model and judges it.
EXAMPLES = {
    "a large red circle at the top left on a white background":
        _one("white", shape="circle", colour="red", size="large", cell="top left"),
    "a large blue square in the center on a black background":
        _one("black", shape="square", colour="blue", size="large", cell="center"),
    "a big yellow triangle at the bottom right against a gray background":
        _one("gray", shape="triangle", colour="yellow", size="large", cell="bottom right"),
    "a small purple circle in the middle on a white background":
        _one("white", shape="circle", colour="purple", size="small", cell="center"),
    "a large purple diamond on the right against a white background":
        _one("white", shape="diamond", colour="purple", size="large", cell="right"),
    "a large blue circle at the top left and a large yellow square at the bottom right on a black background":
        Spec((ObjectSpec("circle", "blue", "large", "top left"), ObjectSpec("square", "yellow", "large", "bottom right")),
             "black"),
    "a small blue square at the bottom right on a black background":
        _one("black", shape="square", colour="blue", size="small", cell="bottom right"),
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
