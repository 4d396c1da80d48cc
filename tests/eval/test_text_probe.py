"""The text-pathway probe: it reads scenes back from states that hold them, and not from noise."""

import pytest
import torch

from lcmserve.errors import InvalidInputError
from lcmserve.eval.text_probe import exact_scenes, fit_probe
from lcmserve.shapes import models as M
from lcmserve.shapes.data import scene_targets
from lcmserve.shapes.scenes import caption_for_index


def _targets(split, n, seed):
    return scene_targets([caption_for_index(i, split, seed)[0] for i in range(n)])


def _perfect_states(t, dim=32):
    """One token per cell holding its shape, colour and size one-hot and its position, plus a background token."""
    one_hot = torch.nn.functional.one_hot
    b = t["shape"].shape[0]
    s, c, z = len(M.SHAPE_CLASSES), len(M.COLOUR_CLASSES), len(M.SIZE_CLASSES)
    cells = torch.cat([
        one_hot(t["shape"], s), one_hot(t["colour"].clamp(min=0), c) * (t["colour"] >= 0)[..., None],
        one_hot(t["size"].clamp(min=0), z) * (t["size"] >= 0)[..., None],
        torch.eye(M.N_CELLS).expand(b, -1, -1),
    ], dim=-1).float()
    background = one_hot(t["background"], len(M.BACKGROUND_CLASSES)).float()
    states = torch.zeros(b, M.N_CELLS + 1, dim)
    states[:, : M.N_CELLS, : cells.shape[-1]] = cells
    states[:, M.N_CELLS, dim - background.shape[-1] :] = background
    return states


def test_probe_reads_scenes_from_states_that_hold_them_and_not_from_noise():
    train, test = _targets("train", 1500, 0), _targets("heldout", 300, 7)
    good = fit_probe(_perfect_states(train), train, _perfect_states(test), test, steps=500, lr=3e-3, batch_size=64)
    assert good["train"] > 0.9 and good["heldout"] > 0.9, good
    noise = fit_probe(torch.randn(1500, 10, 32), train, torch.randn(300, 10, 32), test, steps=200, lr=3e-3, batch_size=64)
    assert noise["heldout"] < 0.05, noise


def test_exact_scenes_needs_every_attribute():
    t = _targets("train", 4, 0)
    logits = {k: torch.nn.functional.one_hot(v.clamp(min=0), n).float() for k, v, n in (
        ("shape", t["shape"], len(M.SHAPE_CLASSES)), ("colour", t["colour"], len(M.COLOUR_CLASSES)),
        ("size", t["size"], len(M.SIZE_CLASSES)), ("background", t["background"], len(M.BACKGROUND_CLASSES)))}
    assert exact_scenes(logits, t) == 1.0
    logits["background"] = logits["background"].roll(1, dims=1)
    assert exact_scenes(logits, t) == 0.0


def test_bad_options_name_the_parameter(tmp_path):
    t = _targets("train", 4, 0)
    with pytest.raises(InvalidInputError, match="mode"):
        fit_probe(torch.zeros(4, 2, 8), t, torch.zeros(4, 2, 8), t, mode="linear")
    with pytest.raises(InvalidInputError, match="steps"):
        fit_probe(torch.zeros(4, 2, 8), t, torch.zeros(4, 2, 8), t, steps=0)
    from lcmserve.eval.text_probe import caption_states

    with pytest.raises(InvalidInputError, match="text_encoder"):
        caption_states(tmp_path, "train", 4, 0)
