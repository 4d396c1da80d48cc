"""How much of a scene can be read back from a text encoder's states: a check of the text pathway.

A teacher's UNet sees the caption only through the text encoder's hidden states, read by
cross-attention. The probe trains a small reader on frozen states of training captions and
scores exact scenes (every object's shape, colour and size in its cell, and the background)
on captions of the held-out split:

- ``readout``: one cross-attention of 9 learned cell queries over the states, then a small MLP
  per cell: about what one UNet cross-attention layer can extract;
- ``deep``: two transformer layers before that read-out: what is in the states at all.

The gap between the two says whether a caption's scene is lost in the text encoder or only
hard for one cross-attention to read out; docs/shapes.md holds what the probe measured on the
shipped teacher. Nothing in the libraries we use offers such a probe.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lcmserve.errors import InvalidInputError
from lcmserve.shapes import models as M
from lcmserve.shapes.data import scene_targets
from lcmserve.shapes.scenes import caption_for_index
from lcmserve.shapes.train import classifier_loss

MODES = ("readout", "deep")


class CellProbe(nn.Module):
    """Nine learned cell queries cross-attend to the states; heads for shape, colour, size, background."""

    def __init__(self, dim: int, deep: bool = False) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True, dropout=0.0), 2
        ) if deep else None
        self.queries = nn.Parameter(torch.randn(M.N_CELLS, dim))
        self.attention = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, M.CELL_LOGITS))
        self.background = nn.Linear(dim, len(M.BACKGROUND_CLASSES))

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.encoder is not None:
            states = self.encoder(states)
        cells, _ = self.attention(self.queries.expand(states.shape[0], -1, -1), states, states)
        return M.scene_logits(self.head(cells), self.background(states.mean(1)))


def exact_scenes(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> float:
    """Share of scenes with every cell's shape (or emptiness), colour, size and the background right."""
    ok = (logits["shape"].argmax(-1) == targets["shape"]).all(1)
    for head in ("colour", "size"):
        ok &= ((logits[head].argmax(-1) == targets[head]) | (targets[head] < 0)).all(1)
    ok &= logits["background"].argmax(-1) == targets["background"]
    return float(ok.float().mean())


def fit_probe(train_states: torch.Tensor, train_targets: dict, test_states: torch.Tensor, test_targets: dict, *,
              mode: str = "readout", steps: int = 2500, batch_size: int = 256, lr: float = 1e-3,
              seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Train the probe on (states, targets) and score exact scenes on both sets."""
    from tqdm import tqdm

    if mode not in MODES:
        raise InvalidInputError.out_of_range("mode", mode, "readout or deep")
    if steps < 1:
        raise InvalidInputError.out_of_range("steps", steps, "an integer >= 1")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = CellProbe(train_states.shape[-1], deep=mode == "deep")
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc=f"probe ({mode})", unit="step", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(0, len(train_states), (batch_size,), generator=gen)
        loss = classifier_loss(probe(train_states[idx]), {k: v[idx] for k, v in train_targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    probe.eval()
    with torch.no_grad():
        n = min(len(train_states), len(test_states))
        train = exact_scenes(probe(train_states[:n]), {k: v[:n] for k, v in train_targets.items()})
        test = exact_scenes(probe(test_states), test_targets)
    return {"train": train, "heldout": test}


def caption_states(model: str | Path, split: str, n: int, seed: int, layer: int = -1):
    """Hidden states (layer ``layer``; -1: the encoder's output, as the UNet sees it) and targets."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(model)
    if not (folder / "text_encoder" / "config.json").is_file():
        raise InvalidInputError(f"model: {str(model)!r} is not a pipeline folder with a text_encoder/", param="model")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    pairs = [caption_for_index(i, split, seed) for i in range(n)]
    states = []
    with torch.no_grad():
        for a in range(0, n, 512):
            ids = tokenizer([c for _, c in pairs[a : a + 512]], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=layer != -1)
            states.append(out.last_hidden_state if layer == -1 else out.hidden_states[layer])
    return torch.cat(states), scene_targets([s for s, _ in pairs])


def probe_text_encoder(model: str | Path, *, mode: str = "readout", layer: int = -1, n_train: int = 20000,
                       n_test: int = 2000, steps: int = 2500, progress: bool = False) -> dict[str, float]:
    """The probe on a pipeline folder's text encoder (e.g. the shipped shapes-teacher)."""
    train_states, train_targets = caption_states(model, "train", n_train, 0, layer)
    test_states, test_targets = caption_states(model, "heldout", n_test, 7, layer)
    return fit_probe(train_states, train_targets, test_states, test_targets, mode=mode, steps=steps,
                     progress=progress)
