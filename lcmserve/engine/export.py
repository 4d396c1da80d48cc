"""ONNX export of an LCM's three networks with a dynamic batch axis, cached by what shapes them.

Graphs: ``text_encoder`` (and ``text_encoder_2`` for SDXL), ``unet`` (with the guidance
embedding input ``timestep_cond`` for a full LCM, ``text_embeds``/``time_ids`` for SDXL) and
``vae_decoder``. The batch axis is dynamic; the latent resolution is fixed per export, so
the cache holds one UNet/VAE graph per resolution. Each graph lives in its own cache entry
keyed by its module's weight fingerprint, dtype, resolution, exporter, opset and the
versions of every library that writes the graph (see engine/cache.py).

``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) is the default and the
exporter torch supports going forward; ``exporter="legacy"`` selects the TorchScript tracer,
deprecated in torch but several times faster to export on CPU.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from lcmserve.engine.cache import ArtifactCache, fingerprint_module, library_versions
from lcmserve.engine.kernels.attention import with_standard_attention
from lcmserve.errors import InvalidInputError
from lcmserve.models.model import LCMModel

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "legacy")
DEFAULT_OPSET = 18
# Bumped whenever the graphs' inputs, outputs or wrappers change meaning.
EXPORT_FORMAT = 1
MAX_EXPORT_BATCH = 256
_EXPORT_LIBRARIES = ("torch", "onnx", "onnxscript", "diffusers", "transformers", "lcmserve")


# -- the modules as exported: plain tensors in, plain tensors out --------------------------------
class TextEncoderGraph(torch.nn.Module):
    """int32 token ids -> the hidden states the UNet attends to (and the pooled projection, if any)."""

    def __init__(self, encoder: torch.nn.Module, penultimate: bool, pooled: bool) -> None:
        super().__init__()
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids: torch.Tensor):
        out = self.encoder(input_ids.long(), output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return (hidden, out[0]) if self.pooled else hidden


class UNetGraph(torch.nn.Module):
    """The UNet with its optional conditions as named tensors (timestep as float32 [B])."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
            added_cond_kwargs=added, return_dict=False,
        )[0]


class VaeDecoderGraph(torch.nn.Module):
    """Scaled latents (already divided by the scaling factor) -> images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


# -- names and shapes of each graph -----------------------------------------------------------
def text_graph(index: int) -> str:
    """The graph name of text encoder ``index``."""
    return "text_encoder" if index == 0 else "text_encoder_2"


def graph_names(model: LCMModel) -> list[str]:
    return [text_graph(i) for i in range(len(model.text_encoders))] + ["unet", "vae_decoder"]


def _has_projection(encoder: torch.nn.Module) -> bool:
    return hasattr(encoder, "text_projection")


def output_names(model: LCMModel, name: str) -> list[str]:
    if name.startswith("text_encoder"):
        return ["hidden", "pooled"] if _has_projection(_source_module(model, name)) else ["hidden"]
    return ["out"] if name == "unet" else ["images"]


# -- calling a graph as the eager backend calls its networks (onnx and tensorrt backends) --------
def text_outputs(outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A text graph's outputs as ``Networks.text`` returns them: hidden states, pooled projection or None."""
    return outs[0], (outs[1] if len(outs) > 1 else None)


def unet_feeds(sample: torch.Tensor, timestep, hidden: torch.Tensor, timestep_cond: torch.Tensor | None = None,
               added: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The UNet graph's named inputs for a ``Networks.unet`` call (the timestep as float32 [B])."""
    t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(sample.shape[0])
    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": hidden}
    if timestep_cond is not None:
        feeds["timestep_cond"] = timestep_cond
    if added is not None:
        feeds.update(added)
    return feeds


def example_inputs(model: LCMModel, name: str, height: int, width: int, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of the given batch size, in the order of the graph's inputs, on the model's device.

    Constant values: tracing does not depend on them, and the global RNG stays untouched.
    """
    device, dtype = model.device, model.dtype
    f = model.vae_scale_factor
    latent = (batch, model.latent_channels, height // f, width // f)
    if name.startswith("text_encoder"):
        length = model.tokenizers[0].model_max_length
        return {"input_ids": torch.zeros(batch, length, dtype=torch.int32, device=device)}
    if name == "vae_decoder":
        return {"latents": torch.zeros(latent, dtype=model.vae.dtype, device=device)}
    cfg = model.unet.config
    inputs = {
        "sample": torch.zeros(latent, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999.0, device=device),
        "encoder_hidden_states": torch.zeros(
            batch, model.tokenizers[0].model_max_length, cfg.cross_attention_dim, dtype=dtype, device=device
        ),
    }
    if cfg.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = torch.zeros(batch, cfg.time_cond_proj_dim, dtype=dtype, device=device)
    if model.family == "sdxl":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["text_embeds"] = torch.zeros(batch, pooled_dim, dtype=dtype, device=device)
        inputs["time_ids"] = torch.full((batch, 6), float(height), dtype=dtype, device=device)
    return inputs


def _graph_module(model: LCMModel, name: str) -> torch.nn.Module:
    if name.startswith("text_encoder"):
        encoder = _source_module(model, name)
        return TextEncoderGraph(encoder, penultimate=model.family == "sdxl", pooled=_has_projection(encoder))
    # The exporter traces diffusers' SDPA processors even when the engine runs our CPU kernel.
    return UNetGraph(with_standard_attention(model.unet)) if name == "unet" else VaeDecoderGraph(model.vae)


def _source_module(model: LCMModel, name: str) -> torch.nn.Module:
    if name.startswith("text_encoder"):
        return model.text_encoders[0 if name == text_graph(0) else 1]
    return model.unet if name == "unet" else model.vae


def check_exporter(exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise InvalidInputError.out_of_range("exporter", exporter, "one of " + ", ".join(EXPORTERS))
    return exporter


def graph_spec(
    model: LCMModel, name: str, height: int, width: int, exporter: str, opset: int, fingerprint: str
) -> dict[str, Any]:
    """Everything that shapes one exported graph; its hash names the cache entry."""
    spec: dict[str, Any] = {
        "graph": name, "format": EXPORT_FORMAT, "weights": fingerprint,
        "dtype": str(_source_module(model, name).dtype).removeprefix("torch."),
        "exporter": exporter, "opset": opset, "versions": library_versions(_EXPORT_LIBRARIES),
        "inputs": {k: list(v.shape[1:]) for k, v in example_inputs(model, name, height, width).items()},
    }
    if not name.startswith("text_encoder"):
        spec["resolution"] = [height, width]
    return spec


def export_graph(model: LCMModel, name: str, height: int, width: int, path: Path, exporter: str, opset: int) -> None:
    """Write one graph as ONNX with a dynamic batch axis (weights beside it as external data)."""
    module = _graph_module(model, name).eval()
    inputs = example_inputs(model, name, height, width)
    outputs = output_names(model, name)
    # The exporters' own logging (graph passes, tracer warnings) is noise here; failures still raise.
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        _export(module, inputs, outputs, path, exporter, opset)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def _export(module, inputs, outputs, path: Path, exporter: str, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
            torch.onnx.export(
                module, (), str(path), kwargs=inputs, input_names=list(inputs), output_names=outputs,
                dynamic_shapes={k: {0: batch} for k in inputs}, opset_version=opset, dynamo=True,
                external_data=True, verbose=False,
            )
        else:
            axes = {k: {0: "batch"} for k in [*inputs, *outputs]}
            torch.onnx.export(
                module, (), str(path), kwargs=inputs, input_names=list(inputs), output_names=outputs,
                dynamic_axes=axes, opset_version=opset, dynamo=False,
            )


def export_model(
    model: LCMModel,
    cache_dir: str | Path,
    height: int,
    width: int,
    *,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    build: bool = True,
    progress: bool = False,
) -> dict[str, Path]:
    """The ONNX file of each graph for this resolution, exported on a cache miss.

    ``build=False`` only looks: a graph that is not cached raises a clear error instead.
    """
    check_exporter(exporter)
    f = model.vae_scale_factor
    if height % f or width % f:
        raise InvalidInputError.out_of_range("height/width", (height, width), f"multiples of {f}")
    cache = ArtifactCache(cache_dir)
    fingerprints = {name: fingerprint_module(_source_module(model, name)) for name in graph_names(model)}
    paths: dict[str, Path] = {}
    from tqdm import tqdm

    for name in tqdm(graph_names(model), desc="ONNX export", unit="graph", disable=not progress):
        spec = graph_spec(model, name, height, width, exporter, opset, fingerprints[name])
        if not build:
            found = cache.lookup(f"onnx-{name}", spec)
            if found is None:
                raise InvalidInputError(
                    f"cache_dir: no ONNX file of {name} for this model at {height}x{width} in {cache.root}; "
                    f"run `lcmserve export {model.name} --out {cache.root} --height {height} --width {width}` "
                    "or allow the backend to export",
                    param="cache_dir",
                )
            paths[name] = found / "model.onnx"
            continue
        folder = cache.get_or_build(
            f"onnx-{name}", spec,
            lambda tmp, name=name: export_graph(model, name, height, width, tmp / "model.onnx", exporter, opset),
        )
        paths[name] = folder / "model.onnx"
    return paths


def write_export_index(model: LCMModel, out_dir: Path, paths: dict[str, Path], height: int, width: int) -> Path:
    """``export.json`` beside the graphs: which file is which, for which model and resolution."""
    index = {
        "model": model.describe(), "height": height, "width": width,
        "graphs": {name: str(path.relative_to(out_dir)) for name, path in paths.items()},
    }
    target = Path(out_dir) / "export.json"
    target.write_text(json.dumps(index, indent=2) + "\n")
    return target
