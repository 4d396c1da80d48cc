"""Prompt suites of ``lcmserve eval``: each prompt with the spec of what it states and a scene it describes.

- ``template``: the full template captions of training scenes (the old training style).
- ``heldout``: full template captions of scenes with a held-out (shape, colour, cell) triple.
- ``language``: captions of the caption language (lcmserve/shapes/language.py) on unseen scenes.
- ``wild``: the fixed prompts of a second grammar that training never sees (lcmserve/eval/wild.py).

Only what a prompt states is scored (``Spec.judge``); the scenes give the FID reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcmserve.errors import InvalidInputError
from lcmserve.shapes.language import Spec, caption_for
from lcmserve.shapes.scenes import Scene, caption_for_index

SUITES = ("template", "heldout", "language", "wild")


@dataclass(frozen=True)
class Prompt:
    text: str
    spec: Spec
    scene: Scene  # a scene the prompt describes (for a real-render floor and FID)


def suite_split(suite: str) -> str:
    """The scene split a suite draws from: its FID reference comes from the same split."""
    return "heldout" if suite == "heldout" else "train"


def suite_prompts(suite: str, n: int, seed: int) -> list[Prompt]:
    """The first ``n`` prompts of a suite (the wild suite has as many as its file holds)."""
    if suite in ("template", "heldout"):
        pairs = [caption_for_index(i, suite_split(suite), seed) for i in range(n)]
        return [Prompt(text, Spec.of_scene(scene), scene) for scene, text in pairs]
    if suite == "language":
        return [Prompt(text, spec, scene) for scene, text, spec in (caption_for(i, "train", seed) for i in range(n))]
    if suite == "wild":
        from lcmserve.eval.wild import load_wild

        return [Prompt(text, spec, scene) for text, spec, scene in load_wild()[:n]]
    raise InvalidInputError.out_of_range("suite", suite, "one of " + ", ".join(SUITES))
