"""Text conditioning of the UNet, one type for serving and distillation alike.

The engine's backends encode prompts into a ``TextConditioning``; distillation encodes its
captions with the same code (distill/teacher.py) and hands the same type to its losses, so a
student is trained on exactly the conditioning it is served with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcmserve.consistency import cfg_batch


@dataclass
class TextConditioning:
    """Per-row text features: cross-attention states [B, L, D] and, for SDXL, pooled embeddings [B, P]."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device, dtype=None) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return TextConditioning(self.hidden.to(device, dtype), pooled)

    def expand(self, rows: int) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.expand(rows, -1)
        return TextConditioning(self.hidden.expand(rows, -1, -1), pooled)

    def index(self, rows) -> TextConditioning:
        return TextConditioning(self.hidden[rows], None if self.pooled is None else self.pooled[rows])

    def clone(self) -> TextConditioning:
        return TextConditioning(self.hidden.clone(), None if self.pooled is None else self.pooled.clone())


def cfg_text(cond: TextConditioning, uncond: TextConditioning) -> TextConditioning:
    """The text of a classifier-free-guidance batch, rows in ``consistency.cfg_batch``'s order."""
    pooled = None if cond.pooled is None else cfg_batch(cond.pooled, uncond.pooled)
    return TextConditioning(cfg_batch(cond.hidden, uncond.hidden), pooled)


def sdxl_time_ids(pooled: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
    """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): original size, crop top-left (0, 0), target size.

    One row per row of ``pooled``, in its dtype and on its device; None for SD (no pooled embedding)."""
    if pooled is None:
        return None
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
    return ids.expand(pooled.shape[0], -1)


def added_cond_kwargs(cond: TextConditioning, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """The UNet's ``added_cond_kwargs``: SDXL's pooled text and time ids; None for SD."""
    return None if time_ids is None else {"text_embeds": cond.pooled, "time_ids": time_ids}
