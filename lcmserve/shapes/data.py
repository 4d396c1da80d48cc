"""Batches of rendered scenes, reproducible by (seed, step) so that a resumed run sees the same data."""

from __future__ import annotations

import random

import numpy as np
import torch

from lcmserve.shapes.models import BACKGROUND_CLASSES, COLOUR_CLASSES, N_CELLS, SHAPE_CLASSES, SIZE_CLASSES
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


def batch_for_step(seed: int, stage: str, step: int, batch_size: int, splits: tuple[str, ...] = ("train",)):
    """Scenes, captions and images of one training step; a pure function of its arguments."""
    rng = random.Random(f"{seed}:{stage}:{step}")
    scenes = [sample_scene(rng, rng.choice(splits)) for _ in range(batch_size)]
    captions = [caption(s, rng) for s in scenes]
    return scenes, captions, to_tensor([render(s) for s in scenes])
