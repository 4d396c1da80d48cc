"""Quality metrics: Frechet distance, CLIP score and exact attribute accuracy."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """scipy's matrix square root; SciPy 1.18 dropped ``disp`` (earlier versions need disp=False for one value)."""
    try:
        return linalg.sqrtm(m, disp=False)[0]
    except TypeError:
        return linalg.sqrtm(m)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al. 2017), as pytorch-fid computes it."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features must be [N, D] with N >= 2 and equal D; got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = _sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        eps = np.eye(len(s_a)) * 1e-6
        covmean = _sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean of 100 * max(cos(image, text), 0) over pairs (Hessel et al. 2021, without their w = 2.5)."""
    cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


def attribute_accuracy(predicted: list, targets: list) -> dict[str, float]:
    """Exact scene accuracy (every object and the background right, nothing extra) and per attribute.

    ``predicted`` and ``targets`` hold (background, {cell: (shape, colour, size)}) pairs.
    """
    if len(predicted) != len(targets) or not targets:
        raise ValueError(f"need equally many predictions and targets; got {len(predicted)} and {len(targets)}")
    exact = layout = shape = colour = size = background = 0
    n_objects = 0
    for (p_bg, p_objs), (t_bg, t_objs) in zip(predicted, targets):
        exact += p_bg == t_bg and p_objs == t_objs
        layout += set(p_objs) == set(t_objs)
        background += p_bg == t_bg
        for cell, (t_shape, t_colour, t_size) in t_objs.items():
            n_objects += 1
            p = p_objs.get(cell)
            shape += p is not None and p[0] == t_shape
            colour += p is not None and p[1] == t_colour
            size += p is not None and p[2] == t_size
    n = len(targets)
    return {
        "accuracy": exact / n, "layout": layout / n, "background": background / n,
        "shape": shape / n_objects, "colour": colour / n_objects, "size": size / n_objects,
    }


def spec_accuracy(predicted: list, specs: list) -> dict[str, float | None]:
    """Accuracy on what prompts state: ``Spec.judge`` per image, averaged.

    ``accuracy``: every stated attribute, the object count and a stated background right. Per part
    (count, shape, colour, size, layout = the cells, background): the mean over the prompts that
    state it (None when none does).
    """
    if len(predicted) != len(specs) or not specs:
        raise ValueError(f"need equally many predictions and specs; got {len(predicted)} and {len(specs)}")
    verdicts = [spec.judge(read) for read, spec in zip(predicted, specs)]
    out: dict[str, float | None] = {"accuracy": sum(v["exact"] for v in verdicts) / len(verdicts)}
    for name, key in (("count", "count"), ("shape", "shape"), ("colour", "colour"), ("size", "size"),
                      ("layout", "cell"), ("background", "background")):
        stated = [v[key] for v in verdicts if v[key] is not None]
        out[name] = sum(stated) / len(stated) if stated else None
    return out
