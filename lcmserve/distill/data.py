"""Training data of distillation: image+caption folders, webdataset tar shards, and the sources
that domains register by name (``lcmserve.models.registry.register_data_source``).

A source is finite (a ``MapSource``: indexable pairs of image and caption) or endless (a
``StreamSource``: the images and captions of any step, drawn afresh). Every batch is a pure
function of (seed, step, rank, processes): finite sets are read in a seeded permutation per
epoch, a stream draws the batch of that step. A resumed run therefore sees exactly the data
an uninterrupted run would have, with no data-loader state to save.

Images are encoded by the VAE once per batch (no gradient) and captions by the text encoder
once per batch; ``cache`` goes further and encodes a finite set once into a file that every
later epoch and run reuses (the VAE's mean and std are stored, so latents are still sampled
fresh each step).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from lcmserve.distill.teacher import Teacher, encode_prompts
from lcmserve.engine.conditioning import TextConditioning
from lcmserve.errors import InvalidInputError
from lcmserve.models.registry import data_source, data_source_names

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = ("txt", "text", "caption")
CAPTION_FILE = "captions.jsonl"


def step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """A CPU generator for one (seed, step, rank, stream): the same draws on any device and after resume."""
    state = np.random.SeedSequence([seed, step, rank, stream]).generate_state(2, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(state[0] % (2**63)))


def to_model_input(image, resolution: int) -> torch.Tensor:
    """PIL image -> float32 [3, R, R] in [-1, 1]: shorter side resized to R, then a centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float() / 127.5 - 1


# -- sources --------------------------------------------------------------------------------
class MapSource:
    """A finite, indexable set of (image, caption) pairs."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int, resolution: int) -> tuple[torch.Tensor, str]:
        raise NotImplementedError

    def caption(self, i: int) -> str:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the set's content, for the cache key."""
        raise NotImplementedError


@runtime_checkable
class StreamSource(Protocol):
    """An endless source: a new batch for every (seed, stream, step), the same one every time it is asked."""

    def batch(self, seed: int, stream: str, step: int, batch_size: int,
              resolution: int) -> tuple[torch.Tensor, list[str]]:
        """Images [B, 3, R, R] in [-1, 1] and their captions."""
        ...


class FolderSource(MapSource):
    """img.png + img.txt pairs (any depth), or images listed in a captions.jsonl at the top."""

    def __init__(self, folder: str) -> None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise InvalidInputError(f"data: folder {folder!r} does not exist", param="data")
        self.root = root
        listing = root / CAPTION_FILE
        self.items = self._from_jsonl(listing) if listing.is_file() else self._from_pairs()

    def _from_jsonl(self, listing: Path) -> list[tuple[Path, str]]:
        items, missing = [], []
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = entry.get("file") or entry.get("file_name") or entry.get("image")
                text = entry.get("caption", entry.get("text"))
            except (json.JSONDecodeError, AttributeError):
                raise InvalidInputError(f"data: {listing} line {n} is not a JSON object", param="data") from None
            if not name or not isinstance(text, str):
                raise InvalidInputError(
                    f"data: {listing} line {n} needs \"file\" and \"caption\" (or \"file_name\" and \"text\")",
                    param="data")
            if not (self.root / name).is_file():
                missing.append(name)
            items.append((self.root / name, text))
        if missing:
            raise InvalidInputError(
                f"data: {len(missing)} image(s) listed in {listing} do not exist: {', '.join(missing[:5])}",
                param="data")
        if not items:
            raise InvalidInputError(f"data: {listing} lists no images", param="data")
        return items

    def _from_pairs(self) -> list[tuple[Path, str]]:
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not images:
            raise InvalidInputError(
                f"data: folder {str(self.root)!r} has no images ({', '.join(IMAGE_EXTS)}); expected img.png + img.txt "
                f"pairs or a {CAPTION_FILE}", param="data")
        missing = [p for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            names = ", ".join(str(p.relative_to(self.root)) for p in missing[:5])
            raise InvalidInputError(
                f"data: {len(missing)} of {len(images)} images in {str(self.root)!r} have no caption ({names}"
                f"{', ...' if len(missing) > 5 else ''}); give each image a .txt file of the same name or list "
                f"them in {CAPTION_FILE}", param="data")
        return [(p, p.with_suffix(".txt").read_text().strip()) for p in images]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, resolution: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        path, text = self.items[i]
        with Image.open(path) as image:
            return to_model_input(image, resolution), text

    def caption(self, i: int) -> str:
        return self.items[i][1]

    def fingerprint(self) -> dict:
        stats = [(str(p.relative_to(self.root)), p.stat().st_size, int(p.stat().st_mtime)) for p, _ in self.items]
        return {"kind": "folder", "root": str(self.root.resolve()), "files": stats,
                "captions": hashlib.sha256("\n".join(t for _, t in self.items).encode()).hexdigest()}


def _shard_paths(spec: str) -> list[Path]:
    paths: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part).expanduser()
        if path.is_dir():
            paths.extend(sorted(path.glob("*.tar")))
        elif any(c in part for c in "*?["):
            paths.extend(Path(p) for p in sorted(glob.glob(os.path.expanduser(part))))
        elif path.is_file():
            paths.append(path)
        else:
            raise InvalidInputError(f"data: shard {part!r} does not exist", param="data")
    return paths


class TarShardSource(MapSource):
    """webdataset shards: members ``KEY.jpg|png|webp`` with ``KEY.txt`` (or ``KEY.json`` with "caption").

    Read with the standard library's tarfile into an index of byte offsets, not with the
    webdataset package: its streaming iterators would have to replay a shard to resume in the
    middle, while an index gives random access, hence the same per-step data after a resume
    and a disjoint slice per process.
    """

    def __init__(self, spec: str) -> None:
        self.shards = _shard_paths(spec)
        if not self.shards:
            raise InvalidInputError(f"data: no .tar shards found in {spec!r}", param="data")
        self.items: list[tuple[int, int, int, str]] = []  # shard, offset, size, caption
        no_caption = []
        for s, shard in enumerate(self.shards):
            groups: dict[str, dict] = {}
            try:
                with tarfile.open(shard, "r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, base = os.path.split(member.name)
                        if "." not in base:
                            continue
                        stem, ext = base.split(".", 1)
                        entry = groups.setdefault(os.path.join(folder, stem), {})
                        ext = ext.lower()
                        if "." + ext in IMAGE_EXTS:
                            entry["image"] = (member.offset_data, member.size)
                        elif ext in CAPTION_EXTS:
                            entry["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
                        elif ext == "json" and "caption" not in entry:
                            meta = json.loads(tar.extractfile(member).read() or b"{}")
                            text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
                            if isinstance(text, str):
                                entry["caption"] = text.strip()
            except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
                raise InvalidInputError(f"data: cannot read shard {str(shard)!r}: {exc}", param="data") from exc
            for key, entry in groups.items():
                if "image" not in entry:
                    continue
                if "caption" not in entry:
                    no_caption.append(f"{shard.name}:{key}")
                    continue
                self.items.append((s, *entry["image"], entry["caption"]))
        if no_caption:
            raise InvalidInputError(
                f"data: {len(no_caption)} samples in the shards have an image but no caption "
                f"({', '.join(no_caption[:5])}); add KEY.txt (or KEY.json with \"caption\") members", param="data")
        if not self.items:
            raise InvalidInputError(f"data: the shards {spec!r} hold no images", param="data")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, resolution: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        s, offset, size, text = self.items[i]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            raw = f.read(size)
        with Image.open(io.BytesIO(raw)) as image:
            return to_model_input(image, resolution), text

    def caption(self, i: int) -> str:
        return self.items[i][3]

    def fingerprint(self) -> dict:
        return {"kind": "tar", "shards": [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime))
                                          for p in self.shards]}


def resize_square(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images [B, C, H, W] resized (bicubic, antialiased) to [B, C, R, R]; unchanged when they are that size."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)


def open_source(data: str, seed: int, num_samples: int) -> MapSource | StreamSource:
    """The source named by ``data``: a registered name, a folder or tar shards. Errors before any training."""
    opener = data_source(data)
    if opener is not None:
        return opener(seed, num_samples)
    path = Path(data).expanduser()
    if path.is_dir() and not any(path.glob("*.tar")):
        return FolderSource(data)
    if path.is_dir() or data.endswith(".tar") or "," in data or any(c in data for c in "*?["):
        return TarShardSource(data)
    names = "".join(f"{name!r}, " for name in data_source_names())
    raise InvalidInputError(
        f"data: {data!r} is neither {names}an image+caption folder, nor webdataset .tar shards", param="data")


# -- batches --------------------------------------------------------------------------------
@dataclass
class Batch:
    """One process's share of one step: scaled latents [B, C, h, w], text states, captions."""

    latents: torch.Tensor
    text: TextConditioning
    captions: list[str]


class TrainData:
    """Per-step batches for one process, encoded by the teacher's VAE and text encoder(s)."""

    def __init__(self, source: MapSource | StreamSource, teacher: Teacher, *, seed: int, batch_size: int,
                 resolution: int, rank: int = 0, world: int = 1, cache: "LatentCache | None" = None) -> None:
        self.source, self.teacher, self.seed = source, teacher, seed
        self.batch_size, self.resolution, self.rank, self.world = batch_size, resolution, rank, world
        self.cache = cache
        self._perm: tuple[int, torch.Tensor] | None = None

    def indices(self, step: int) -> list[int]:
        """Sample indices of this process at ``step``: a seeded permutation per epoch, sliced by rank."""
        n = len(self.source)
        first = (step * self.world + self.rank) * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            epoch, pos = divmod(p, n)
            if self._perm is None or self._perm[0] != epoch:
                gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                self._perm = (epoch, torch.randperm(n, generator=gen))
            out.append(int(self._perm[1][pos]))
        return out

    def pixels(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """Images [B, 3, R, R] in [-1, 1] and captions of this process at ``step``."""
        if isinstance(self.source, StreamSource):
            stream = "distill" if self.world == 1 else f"distill-{self.rank}-of-{self.world}"
            return self.source.batch(self.seed, stream, step, self.batch_size, self.resolution)
        loaded = [self.source.load(i, self.resolution) for i in self.indices(step)]
        return torch.stack([x for x, _ in loaded]), [c for _, c in loaded]

    def batch(self, step: int, device: torch.device) -> Batch:
        gen = step_generator(self.seed, step, self.rank, stream=1)
        if self.cache is not None:
            rows = torch.tensor(self.indices(step))
            mean, std = self.cache.mean[rows], self.cache.std[rows]
            text, captions = self.cache.text.index(rows), [self.cache.captions[i] for i in rows.tolist()]
        else:
            images, captions = self.pixels(step)
            mean, std = encode_images(self.teacher, images)
            text = encode_prompts(self.teacher, captions)
        latents = mean + std * torch.randn(mean.shape, generator=gen)
        latents = latents * self.teacher.vae.config.scaling_factor
        return Batch(latents.to(device), text.to(device), captions)


@torch.no_grad()
def encode_images(teacher: Teacher, images: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std (float32, CPU) of images in [-1, 1]."""
    vae = teacher.vae
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    means, stds = [], []
    for i in range(0, len(images), chunk):
        dist = vae.encode(images[i : i + chunk].to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


# -- the cache ------------------------------------------------------------------------------
@dataclass
class LatentCache:
    """VAE posteriors and text states of a whole finite source, encoded once."""

    mean: torch.Tensor
    std: torch.Tensor
    text: TextConditioning
    captions: list[str]


def cache_key(source: MapSource, teacher: Teacher, resolution: int) -> str:
    weights = []
    for name in ("vae", "text_encoder", "text_encoder_2"):
        folder = teacher.info.folder / name
        if folder.is_dir():
            weights += [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(folder.iterdir())]
    blob = json.dumps({"source": source.fingerprint(), "teacher": str(teacher.info.folder.resolve()),
                       "weights": weights, "resolution": resolution}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_or_load_cache(path: str, source: MapSource, teacher: Teacher, resolution: int, *,
                        is_main: bool, wait=lambda: None, chunk: int = 32) -> LatentCache:
    """Load ``path`` if it was built from this data and teacher; else encode everything (main process) and save."""
    from tqdm import tqdm

    key = cache_key(source, teacher, resolution)
    file = Path(path).expanduser()

    def read() -> LatentCache | None:
        if not file.is_file():
            return None
        blob = torch.load(file, map_location="cpu", weights_only=True)
        if blob.get("key") != key:
            return None
        text = TextConditioning(blob["hidden"], blob.get("pooled"))
        return LatentCache(blob["mean"], blob["std"], text, blob["captions"])

    cache = read()
    if cache is None and is_main:
        if file.exists():
            logger.warning("cache %s was built from other data, teacher or resolution; rebuilding it", file)
        means, stds, hidden, pooled, captions = [], [], [], [], []
        for i in tqdm(range(0, len(source), chunk), desc="encode cache", unit="batch"):
            loaded = [source.load(j, resolution) for j in range(i, min(i + chunk, len(source)))]
            mean, std = encode_images(teacher, torch.stack([x for x, _ in loaded]))
            text = encode_prompts(teacher, [c for _, c in loaded])
            means.append(mean)
            stds.append(std)
            hidden.append(text.hidden.cpu())
            captions.extend(c for _, c in loaded)
            if text.pooled is not None:
                pooled.append(text.pooled.cpu())
        blob = {"key": key, "mean": torch.cat(means), "std": torch.cat(stds), "hidden": torch.cat(hidden),
                "captions": captions}
        if pooled:
            blob["pooled"] = torch.cat(pooled)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, file)
        logger.info("cached %d encoded samples in %s (%.1f MiB)", len(source), file, file.stat().st_size / 2**20)
    wait()
    cache = cache or read()
    if cache is None:
        raise InvalidInputError(f"cache: {file} could not be built or read", param="cache")
    return cache


def first_captions(data: TrainData, n: int) -> list[str]:
    """Captions for the sample grids: the first ``n`` of the set, or of the stream's first scenes."""
    if n == 0:
        return []
    if isinstance(data.source, StreamSource):
        return data.source.batch(data.seed, "distill-samples", 0, n, data.resolution)[1]
    return [data.source.caption(i) for i in range(min(n, len(data.source)))]
