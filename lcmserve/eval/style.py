"""Reading the style an image was drawn in (shapes/scenes.py STYLES) from what the judge reads.

A style changes the scene drawn (the shifted palette draws each colour one hue step on), so an image is in a
style when the judge reads it as that style's version of what its prompt states: ``styled_spec``. Only prompts
that state a colour show the palette; the others say nothing about it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lcmserve.shapes.language import ObjectSpec, Spec
from lcmserve.shapes.scenes import SHIFTED, STYLES


def styled_spec(spec: Spec, style: str) -> Spec:
    """What a prompt's spec asks for when drawn in ``style``."""
    if style not in STYLES:
        raise ValueError(f"style: {style!r} is not one of {', '.join(STYLES)}")
    if style == "plain":
        return spec
    return Spec(tuple(ObjectSpec(o.shape, SHIFTED.get(o.colour) if o.colour else None, o.size, o.cell)
                      for o in spec.objects), spec.background)


def style_share(reads: Sequence[tuple], specs: Sequence[Spec], style: str) -> float | None:
    """Of the images whose prompt states a colour, the share whose colours read as ``style`` draws them (None: no
    prompt states a colour)."""
    verdicts = [styled_spec(spec, style).judge(read)["colour"] for read, spec in zip(reads, specs)]
    shown = [v for v in verdicts if v is not None]
    return sum(shown) / len(shown) if shown else None
