"""Shape buckets of the compiled backends (CUDA graphs, TensorRT): which to build, which a batch uses.

A compiled graph has fixed shapes, so a backend builds one per bucket (rows, steps,
resolution) and a batch runs in the smallest bucket that holds it; the rows in between
are padded with copies of the last row and cut off again after decoding. Rows never mix
(per-row noise, per-row guidance, no batch statistics), so padding cannot change a real row.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from lcmserve.engine.backends.base import Bucket, DenoiseBatch
from lcmserve.engine.request import MAX_STEPS, MIN_STEPS, SIZE_MULTIPLE
from lcmserve.errors import InvalidInputError

MAX_BUCKET_BATCH = 64


def _ints(name: str, values, low: int, high: int) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high for v in values):
        raise InvalidInputError.out_of_range(name, list(values), f"a non-empty list of integers in [{low}, {high}]")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class BucketSet:
    """The shapes a compiled backend builds: every combination of these three lists."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    """Rows per compiled batch; a batch of n rows runs in the smallest size >= n."""
    steps: tuple[int, ...] = (4,)
    """LCM step counts (each has its own timesteps, so its own graph)."""
    resolutions: tuple[tuple[int, int], ...] = ((512, 512),)
    """(height, width) pairs in pixels, multiples of 8."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", _ints("batch_sizes", self.batch_sizes, 1, MAX_BUCKET_BATCH))
        object.__setattr__(self, "steps", _ints("steps", self.steps, MIN_STEPS, MAX_STEPS))
        sizes = tuple(tuple(r) for r in self.resolutions)
        if not sizes or any(len(r) != 2 or any(not isinstance(v, int) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE
                                                 for v in r) for r in sizes):
            raise InvalidInputError.out_of_range(
                "resolutions", list(self.resolutions),
                f"a non-empty list of (height, width) multiples of {SIZE_MULTIPLE}",
            )
        object.__setattr__(self, "resolutions", tuple(sorted(set(sizes))))

    @classmethod
    def parse(cls, batch_sizes: str, steps: str, resolutions: str) -> BucketSet:
        """From CLI strings: ``"1,2,4,8"``, ``"4"``, ``"512x512,768x512"`` (height x width)."""
        def ints(name: str, text: str) -> list[int]:
            try:
                return [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise InvalidInputError.out_of_range(name, text, "comma-separated integers like 1,2,4,8") from None

        return cls(tuple(ints("batch_sizes", batch_sizes)), tuple(ints("steps", steps)), parse_resolutions(resolutions))

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def buckets(self) -> list[Bucket]:
        shapes = itertools.product(self.resolutions, self.steps, self.batch_sizes)
        return [Bucket(b, s, h, w) for (h, w), s, b in shapes]

    def choose(self, batch_size: int, steps: int, height: int, width: int) -> Bucket:
        """The smallest built bucket that holds the batch; a clear error when none does."""
        if (height, width) not in self.resolutions:
            built = ", ".join(f"{h}x{w}" for h, w in self.resolutions)
            raise InvalidInputError(
                f"height/width must be a built resolution ({built}); got {height}x{width}; "
                "rebuild the backend with that resolution", param="height",
            )
        if steps not in self.steps:
            raise InvalidInputError(
                f"steps must be one of the built step counts {list(self.steps)}; got {steps}; "
                "rebuild the backend with that step count", param="steps",
            )
        fits = [b for b in self.batch_sizes if b >= batch_size]
        if batch_size < 1 or not fits:
            raise InvalidInputError(
                f"batch_size must be in [1, {self.max_batch_size}] (the largest built bucket); got {batch_size}; "
                "split the batch or rebuild the backend with a larger batch bucket", param="batch_size",
            )
        return Bucket(fits[0], steps, height, width)


def parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """``"512x512,768x512"`` (height x width; a single number is square) as (height, width) pairs."""
    pairs = []
    for item in (r.strip() for r in text.split(",") if r.strip()):
        h, _, w = item.lower().partition("x")
        try:
            pairs.append((int(h), int(w or h)))
        except ValueError:
            raise InvalidInputError.out_of_range(
                "resolutions", text, "comma-separated HEIGHTxWIDTH like 512x512 (or one size like 512)"
            ) from None
    return tuple(pairs)


def pad_batch(batch: DenoiseBatch, size: int) -> DenoiseBatch:
    """The batch grown to ``size`` rows by repeating its last row (a no-op when already that size)."""
    rows = batch.noise.shape[1]
    if size < rows:
        raise ValueError(f"cannot pad a batch of {rows} rows down to {size}")
    if size == rows:
        return batch
    extra = size - rows

    def grow(t: torch.Tensor, dim: int) -> torch.Tensor:
        last = t.narrow(dim, rows - 1, 1)
        return torch.cat([t, last.expand(*[extra if d == dim else -1 for d in range(t.ndim)])], dim=dim)

    return dataclasses.replace(
        batch,
        input_ids=tuple(grow(ids, 0) for ids in batch.input_ids),
        noise=grow(batch.noise, 1),
        guidance_scale=grow(batch.guidance_scale, 0),
        negative_ids=None if batch.negative_ids is None else tuple(grow(ids, 0) for ids in batch.negative_ids),
        negative_rows=None if batch.negative_rows is None else grow(batch.negative_rows, 0),
    )
