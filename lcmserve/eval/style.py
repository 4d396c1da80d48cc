"""Reading the drawing style of shapes images: plain fills, or fills with an outline (shapes/scenes.py STYLES).

An outlined scene has a stroke of ``outline_colour(background)`` (white on black, black elsewhere) around every
object; no fill colour and no background is near it. So the style is read from the share of the image's pixels
within ``TOLERANCE`` of the outline colour of the background the judge reads: at least ``MIN_SHARE`` is outline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lcmserve.shapes.scenes import outline_colour

TOLERANCE = 60 / 255  # per channel
# A small object's stroke is about 2% of a 64x64 image; plain renders have none (tests/eval/test_style.py).
MIN_SHARE = 0.006


def outline_share(images: torch.Tensor, backgrounds: Sequence[str]) -> torch.Tensor:
    """Per image [B, 3, H, W] in [0, 1]: the share of pixels in the outline colour of its background."""
    target = torch.tensor([outline_colour(bg) for bg in backgrounds], dtype=images.dtype) / 255
    near = (images - target[:, :, None, None]).abs().amax(dim=1) <= TOLERANCE
    return near.flatten(1).float().mean(dim=1)


def reads_outlined(images: torch.Tensor, backgrounds: Sequence[str]) -> list[bool]:
    return [bool(share >= MIN_SHARE) for share in outline_share(images, backgrounds)]
