"""AOTInductor packages: the compiled backend's networks as per-shape programs kept in the artefact cache.

Why: with freezing (the compiled backend's default on a CPU) inductor's FX-graph cache skips every
graph that holds oneDNN-prepacked weights, so torch.compile generates each bucket's code again at
every start (docs/results/compile-cache-xeon-amx.md). An AOTInductor package is the same inductor
code (frozen and prepacked weights, C++ wrapper, our kernels called as operators) built ahead of
time into a shared library that carries its weights: torch.export traces a network at one input
shape, ``aoti_compile_and_package`` builds it, and the next start loads it in a fraction of a
second (docs/results/aoti-cache-xeon-amx.md).

Each network (text encoder(s), UNet, VAE decode) gets one package per input signature, built on
the signature's first call (at warm-up) or loaded from ``CACHE/aoti``, under a hash of everything
that shapes its code: the module's weights and config, the classes of its layers (attention
processors, our group norm) and the source of ours, the input shapes and dtypes, inductor's
settings, the thread count (inductor writes it into its parallel loops), the CPU, the C++ compiler
and the versions of torch, diffusers and transformers. A network that torch.export or AOTInductor
cannot handle runs through torch.compile as before, with one warning that says why.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcmserve.engine.backends.torch import Networks
from lcmserve.engine.cache import ArtifactCache, default_cache_dir, file_sha256, fingerprint_module, library_versions
from lcmserve.engine.kernels.build import compiler_version, cpu_flags, find_compilers
from lcmserve.engine.kernels.group_norm import for_inductor_export
from lcmserve.models.model import LCMModel

logger = logging.getLogger(__name__)

PACKAGE = "network.pt2"
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "timestep_cond", "text_embeds", "time_ids")


@dataclass
class PackageStats:
    """What warm-up did per network and input shape: packages loaded from the cache, built, or compiled instead."""

    loaded: int = 0
    built: int = 0
    fallbacks: int = 0


# 1. the networks as modules of tensors in, tensors out (what torch.export takes) ---------------------
class TextExport(torch.nn.Module):
    """A text encoder on [B, L] ids: (last hidden states,) for SD; (penultimate hidden states, output 0) for SDXL."""

    def __init__(self, encoder: torch.nn.Module, last_layer: bool) -> None:
        super().__init__()
        self.encoder, self.last_layer = encoder, last_layer

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.last_layer:
            return (self.encoder(input_ids)[0],)
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]


class UNetExport(torch.nn.Module):
    """The UNet over the inputs named in ``names`` (a subset of ``UNET_INPUTS``, in that order)."""

    def __init__(self, unet: torch.nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.unet, self.names = unet, tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.names, tensors))
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given} or None
        return self.unet(given["sample"], given["timestep"], encoder_hidden_states=given["encoder_hidden_states"],
                         timestep_cond=given.get("timestep_cond"), added_cond_kwargs=added, return_dict=False)[0]


class DecodeExport(torch.nn.Module):
    """The VAE's decoder on latents already divided by the scaling factor."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


# 2. what shapes a package ----------------------------------------------------------------------------
def module_form(module: torch.nn.Module) -> dict[str, str]:
    """The classes of a module's layers and attention processors, each with a hash of its source when it is ours.

    The weights' fingerprint misses code that changes the traced graph without touching a weight:
    ``--attention small-head`` swaps processors, the compiled backend swaps group norms."""
    classes = {type(m) for m in module.modules()}
    classes |= {type(m.processor) for m in module.modules() if hasattr(m, "processor")}
    form = {}
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        source = ""
        if cls.__module__.startswith("lcmserve"):
            source = file_sha256(Path(inspect.getsourcefile(cls)))[:16]
        form[f"{cls.__module__}.{cls.__qualname__}"] = source
    return form


def machine_spec() -> dict[str, Any]:
    """What of this machine and its libraries shapes inductor's code."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    _, cxx = find_compilers()
    return {
        "threads": torch.get_num_threads(), "vec_isa": str(pick_vec_isa()), "cpu_flags": cpu_flags(),
        "cxx_version": compiler_version(cxx) if cxx else "none",
        "versions": library_versions(("torch", "diffusers", "transformers", "lcmserve")),
    }


def signature(tensors: Sequence[torch.Tensor]) -> tuple[tuple[tuple[int, ...], str], ...]:
    return tuple((tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors)


# 3. one network: a package per input signature ---------------------------------------------------------
class PackagedNetwork:
    """A network as AOTInductor packages, one per input signature, loaded or built on the signature's first call.

    ``fallback`` (torch.compile of the same module) runs every call once a package could not be made."""

    def __init__(self, name: str, module: torch.nn.Module, fallback: Callable, cache: ArtifactCache,
                 spec: dict[str, Any], inductor_configs: dict[str, Any], stats: PackageStats) -> None:
        self.name, self.module, self.fallback, self.cache = name, module.eval(), fallback, cache
        self.spec, self.inductor_configs, self.stats = spec, inductor_configs, stats
        self.failed: str | None = None
        self._programs: dict[tuple, Callable] = {}

    def __call__(self, *tensors: torch.Tensor):
        if self.failed is None and all(isinstance(t, torch.Tensor) for t in tensors):
            key = signature(tensors)
            program = self._programs.get(key)
            if program is None:
                program = self._load_or_build(key, tensors)
            if program is not None:
                # The package was traced with contiguous inputs and reads them as such.
                return program(*(t.contiguous() for t in tensors))
        return self.fallback(*tensors)

    def _load_or_build(self, key: tuple, tensors: Sequence[torch.Tensor]) -> Callable | None:
        spec = {**self.spec, "inputs": [list(map(str, k)) for k in key]}
        built = []

        def build(folder: Path) -> None:
            self._build(folder, tensors)
            built.append(folder)

        try:
            folder = self.cache.get_or_build(f"aoti-{self.name}", spec, build)
            program = torch._inductor.aoti_load_package(str(folder / PACKAGE))
        except Exception as exc:  # noqa: BLE001 - any export or compile failure falls back to torch.compile
            self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self.stats.fallbacks += 1
            logger.warning("compiled backend: no AOTInductor package for the %s (%s); it runs through torch.compile "
                           "instead, compiled at every start", self.name, self.failed)
            return None
        if built:
            self.stats.built += 1
        else:
            self.stats.loaded += 1
        self._programs[key] = program
        return program

    def _build(self, folder: Path, tensors: Sequence[torch.Tensor]) -> None:
        # Warm-up runs under inference mode; the exporter traces outside it, on ordinary copies of the inputs.
        with torch.inference_mode(False), torch.no_grad():
            example = tuple(t.detach().clone().contiguous() for t in tensors)
            with for_inductor_export():
                program = torch.export.export(self.module, example)
            aoti_compile_and_package(program, str(folder / PACKAGE), self.inductor_configs)


def aoti_compile_and_package(program, package_path: str, inductor_configs: dict[str, Any]) -> str:
    """AOTInductor's build of an exported program into a package (a seam for tests)."""
    return torch._inductor.aoti_compile_and_package(program, package_path=package_path,
                                                    inductor_configs=inductor_configs)


# 4. the three networks ---------------------------------------------------------------------------------
def packaged_networks(model: LCMModel, compile_fn: Callable[[torch.nn.Module], Callable],
                      inductor_configs: dict[str, Any], cache_dir: str | os.PathLike | None = None,
                      stats: PackageStats | None = None) -> Networks:
    """The model's networks as AOTInductor packages from ``CACHE/aoti``; ``compile_fn`` (torch.compile with the
    backend's options) runs a network whose package could not be made."""
    stats = stats if stats is not None else PackageStats()
    cache = ArtifactCache(Path(cache_dir or default_cache_dir()) / "aoti")
    common = {"dtype": model.dtype_name, "inductor": dict(sorted(inductor_configs.items())), **machine_spec()}

    def network(name: str, module: torch.nn.Module, fingerprint: str, **extra) -> PackagedNetwork:
        spec = {**common, "network": name, "module": fingerprint, "form": module_form(module), **extra}
        return PackagedNetwork(name, module, compile_fn(module), cache, spec, inductor_configs, stats)

    # 1. text encoders: the hidden states the UNet reads, and SDXL's pooled projection
    last_layer = model.family == "sd"
    encoders = [network(f"text-encoder-{i}", TextExport(encoder, last_layer), fingerprint_module(encoder))
                for i, encoder in enumerate(model.text_encoders)]

    def text(index: int, input_ids: torch.Tensor):
        out = encoders[index](input_ids.to(model.device))
        pooled = out[1] if len(out) > 1 and out[1].ndim == 2 else None
        return out[0], pooled

    # 2. UNet: one module per set of inputs given (a CFG model's UNet has no guidance condition, SDXL adds two)
    unet_fingerprint = fingerprint_module(model.unet)
    unets: dict[tuple[str, ...], PackagedNetwork] = {}

    def unet(sample, timestep, hidden, timestep_cond=None, added=None) -> torch.Tensor:
        given = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden,
                 "timestep_cond": timestep_cond, **(added or {})}
        names = tuple(n for n in UNET_INPUTS if given.get(n) is not None)
        if names not in unets:
            unets[names] = network("unet", UNetExport(model.unet, names), unet_fingerprint, input_names=list(names))
        return unets[names](*(given[n] for n in names))

    # 3. VAE decode
    decoder = network("vae-decode", DecodeExport(model.vae), fingerprint_module(model.vae))

    def vae(scaled_latents: torch.Tensor) -> torch.Tensor:
        return decoder(scaled_latents.to(model.vae.dtype))

    return Networks(text, unet, vae)
