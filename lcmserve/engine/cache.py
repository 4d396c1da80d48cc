"""On-disk cache of compiled artefacts (ONNX graphs, TensorRT engines, kernels), never stale, never trusted blindly.

An entry is a folder named after the hash of everything that shapes its artefact (the
weights' fingerprint, dtype, bucket or resolution, library versions, ...), so a change in any
of them maps to a different folder and can never pick up an old file. Each folder carries a
``manifest.json`` with the full spec and a SHA-256 of every file; a folder whose files no
longer match (truncated download, disk error, a hand edit) is rebuilt with a warning.
Entries are built in a temporary folder and renamed into place, so a crash mid-build leaves
no half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def cache_key(spec: dict[str, Any]) -> str:
    """SHA-256 of the spec's canonical JSON: equal specs give equal keys, any change a new one."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_module(module: torch.nn.Module) -> str:
    """Hash of a module's class, config and every parameter and buffer (names, dtypes, shapes, bytes).

    The config's ``_``-prefixed keys (``_name_or_path``, ``_diffusers_version``) are left out: the
    same weights loaded from another folder compute the same thing."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        as_dict = {k: v for k, v in as_dict.items() if not str(k).startswith("_")}
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the named distributions ("absent" for those not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


class ArtifactCache:
    """Folders of artefacts under ``root``, one per (kind, spec), verified on every lookup."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    @staticmethod
    def entry_key(kind: str, spec: dict[str, Any]) -> str:
        return cache_key({"kind": kind, **spec})

    def entry_dir(self, kind: str, spec: dict[str, Any]) -> Path:
        return self.root / f"{kind}-{self.entry_key(kind, spec)[:24]}"

    def check(self, folder: Path, spec: dict[str, Any], kind: str) -> str | None:
        """None if ``folder`` is a complete, unmodified entry for this spec; else what is wrong."""
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            return "no manifest"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return f"unreadable manifest ({exc})"
        if manifest.get("key") != self.entry_key(kind, spec):
            return "manifest is for a different spec"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return "manifest lists no files"
        for rel, expected in files.items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != expected.get("bytes"):
                return f"{rel} has {path.stat().st_size} bytes, expected {expected.get('bytes')}"
            if file_sha256(path) != expected.get("sha256"):
                return f"{rel} does not match its checksum"
        return None

    def lookup(self, kind: str, spec: dict[str, Any]) -> Path | None:
        """The entry's folder if present and intact; a damaged entry is removed with a warning."""
        folder = self.entry_dir(kind, spec)
        if not folder.exists():
            return None
        problem = self.check(folder, spec, kind)
        if problem is None:
            return folder
        logger.warning("cache entry %s is damaged (%s); it will be rebuilt", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def get_or_build(self, kind: str, spec: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """Return the verified entry, building it with ``build(folder)`` when missing or damaged."""
        found = self.lookup(kind, spec)
        if found is not None:
            logger.debug("cache hit %s", found)
            return found
        folder = self.entry_dir(kind, spec)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        started = time.perf_counter()
        try:
            build(tmp)
            self._write_manifest(tmp, kind, spec)
            if folder.exists():  # another process finished the same entry first
                shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("built %s in %.1f s -> %s", kind, time.perf_counter() - started, folder)
        return folder

    @staticmethod
    def _write_manifest(folder: Path, kind: str, spec: dict[str, Any]) -> None:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        if not files:
            raise RuntimeError(f"building {kind} wrote no files into {folder}")
        manifest = {
            "kind": kind, "key": ArtifactCache.entry_key(kind, spec), "spec": spec, "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


CACHE_ENV = "LCMSERVE_CACHE_DIR"  # the same name as the server's ``cache_dir`` setting


def default_cache_dir() -> Path:
    """``$LCMSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lcmserve``, else ``~/.cache/lcmserve``."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lcmserve"
    )
    return Path(base)


INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_inductor_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Keep torch.compile's on-disk caches in ``CACHE/inductor`` (``cache_dir``, else ``default_cache_dir()``) unless
    ``$TORCHINDUCTOR_CACHE_DIR`` is set, and turn its FX-graph and AOTAutograd caches on; returns the folder.

    Inductor keys each entry by a hash of what shapes its code: the graph with its inputs' shapes, dtypes and
    strides, inductor's settings (freezing, the C++ wrapper), torch's version and the compiler; frozen weights
    enter by shape and dtype, as the code reads their values at run time. So an entry is never stale, and a
    second start of the same model (or another of its architecture) skips code generation and the C++ builds;
    dynamo still traces. Set once per process, before the first compile: inductor reads the variable
    whenever it writes. Importing torch._dynamo sets it to torch's default, so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    if os.environ.get(INDUCTOR_ENV) in (None, "", torch_default()):
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        os.environ[INDUCTOR_ENV] = str(root / "inductor")
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return Path(os.environ[INDUCTOR_ENV])
