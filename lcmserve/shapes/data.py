"""Batches of rendered scenes, reproducible by (seed, step) so that a resumed run sees the same data;
the same scenes as a data source of ``lcmserve distill --data shapes``."""

from __future__ import annotations

import random

import numpy as np
import torch

from lcmserve.distill.data import MapSource, resize_square
from lcmserve.shapes.models import BACKGROUND_CLASSES, COLOUR_CLASSES, N_CELLS, SHAPE_CLASSES, SIZE_CLASSES
from lcmserve.shapes.language import describe, unplaced_spec
from lcmserve.shapes.scenes import CELLS, Scene, caption, render, sample_scene


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float32 [B, 3, H, W] in [0, 1]."""
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices per cell (shape 0 = empty; colour/size -1 where the cell is empty) and background."""
    shape = torch.zeros(len(scenes), N_CELLS, dtype=torch.long)
    colour = torch.full((len(scenes), N_CELLS), -1, dtype=torch.long)
    size = torch.full((len(scenes), N_CELLS), -1, dtype=torch.long)
    background = torch.zeros(len(scenes), dtype=torch.long)
    for b, scene in enumerate(scenes):
        background[b] = BACKGROUND_CLASSES.index(scene.background)
        for obj in scene.objects:
            c = CELLS.index(obj.cell)
            shape[b, c] = SHAPE_CLASSES.index(obj.shape)
            colour[b, c] = COLOUR_CLASSES.index(obj.colour)
            size[b, c] = SIZE_CLASSES.index(obj.size)
    return {"shape": shape, "colour": colour, "size": size, "background": background}


def mix_full_captions(scenes: list[Scene], texts: list[str], share: float, rng: random.Random) -> list[str]:
    """``texts`` with about ``share`` of them replaced by their scene's full template caption; ``rng`` is a
    stream of its own, so the other draws of a run stay those of a run without the mix."""
    return [caption(s, rng) if rng.random() < share else t for s, t in zip(scenes, texts)]


def mix_unplaced_captions(scenes: list[Scene], texts: list[str], share: float, rng: random.Random) -> list[str]:
    """``texts`` with about ``share`` of the two-object scenes' captions replaced by a caption of the language
    that leaves out where one or both objects go (``language.unplaced_spec``); ``rng`` is a stream of its own."""
    def write(scene: Scene) -> str:
        return describe(scene, rng, unplaced_spec(scene, rng))[0]

    return [write(s) if len(s.objects) == 2 and rng.random() < share else t for s, t in zip(scenes, texts)]


CAPTIONS = ("language", "template", "mixed")
MIXED_FULL_SHARE = 0.5  # the teacher's --full-captions share that kept template and held-out prompts right


def batch_for_step(seed: int, stage: str, step: int, batch_size: int, splits: tuple[str, ...] = ("train",),
                   style: str = "plain", captions: str = "language"):
    """Scenes, captions and images of one training step; a pure function of its arguments. ``captions``: the
    caption language (language.describe), the full template captions (scenes.caption) that the models before
    it learnt, or ``mixed``: the language with a share of its captions replaced by the full template caption
    (drawn from a stream of its own, so the other captions are the language's). The scenes and captions do not
    depend on ``style``, only the drawing does."""
    if captions not in CAPTIONS:
        raise ValueError(f"captions: {captions!r} is not one of {', '.join(CAPTIONS)}")
    rng = random.Random(f"{seed}:{stage}:{step}")
    scenes = [sample_scene(rng, rng.choice(splits)) for _ in range(batch_size)]
    write = (lambda s: caption(s, rng)) if captions == "template" else (lambda s: describe(s, rng)[0])
    texts = [write(s) for s in scenes]
    if captions == "mixed":
        texts = mix_full_captions(scenes, texts, MIXED_FULL_SHARE, random.Random(f"{seed}:{stage}:{step}:full"))
    return scenes, texts, to_tensor([render(s, style=style) for s in scenes])


class ShapesStream:
    """The endless scene generator as a distillation source: a new batch of train-split scenes every step."""

    def __init__(self, style: str = "plain", captions: str = "language") -> None:
        self.style, self.captions = style, captions

    def batch(self, seed: int, stream: str, step: int, batch_size: int,
              resolution: int) -> tuple[torch.Tensor, list[str]]:
        _, captions, images = batch_for_step(seed, stream, step, batch_size, style=self.style, captions=self.captions)
        return resize_square(images * 2 - 1, resolution), captions


class ShapesSetSource(MapSource):
    """A fixed set of ``n`` scenes of the train split (for caching and epochs)."""

    chunk = 256

    def __init__(self, seed: int, n: int, style: str = "plain", captions: str = "language") -> None:
        images, texts = [], []
        for c in range(-(-n // self.chunk)):
            _, caps, imgs = batch_for_step(seed, "distill-set", c, self.chunk, style=style, captions=captions)
            images.append((imgs * 255).round().to(torch.uint8))
            texts.extend(caps)
        self.images = torch.cat(images)[:n]
        self.captions = texts[:n]
        self.seed, self.style, self.language = seed, style, captions

    def __len__(self) -> int:
        return len(self.captions)

    def load(self, i: int, resolution: int) -> tuple[torch.Tensor, str]:
        return resize_square(self.images[i : i + 1].float() / 127.5 - 1, resolution)[0], self.captions[i]

    def caption(self, i: int) -> str:
        return self.captions[i]

    def fingerprint(self) -> dict:
        extra = {**({"style": self.style} if self.style != "plain" else {}),
                 **({"captions": self.language} if self.language != "language" else {})}
        return {"kind": "shapes", "seed": self.seed, "n": len(self), **extra}


def open_distill_source(seed: int, num_samples: int, style: str = "plain",
                        captions: str = "language") -> ShapesStream | ShapesSetSource:
    """``--data shapes``: a fixed set of ``num_samples`` scenes, or the endless stream when it is 0;
    ``--data shapes-shifted``: the same scenes and captions drawn in the shifted palette (the style adapter's data);
    the ``-template`` twins caption them with the full template captions, for models that learnt those;
    ``--data shapes-mixed`` replaces half the language's captions by full template captions, as the teacher
    learnt them (``shapes train teacher --full-captions``)."""
    return (ShapesSetSource(seed, num_samples, style, captions) if num_samples
            else ShapesStream(style, captions))
