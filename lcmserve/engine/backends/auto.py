"""``auto``: the fastest backend, dtype and attention this machine supports for this model, by one rule table.

The rule is ``RULES`` below: rows of (condition, backend, dtype, attention, the result that backs it),
read top to bottom, the first row whose condition holds and whose backend can run what the user fixed
wins. It reads the machine (``Machine.probe``: GPU or CPU, the CPU's native bfloat16 and vector width,
a C/C++ compiler for inductor and our kernels, ONNX Runtime) and one fact of the model: the size of its
attention heads, which decides whether the small-head kernel pays. That fact comes from the UNet's
config, so the choice can be made before the model is loaded, as it must be: the dtype is chosen first.

Only what the user left at ``auto`` is picked: a given ``dtype`` or ``attention`` wins, and a row whose
backend cannot run it (ONNX Runtime on a CPU runs float32 only; small-head needs a backend that runs
torch's modules) is skipped. A one-off run (``generate``) takes the row's ``once`` pick: compiling
buckets costs more start-up than a few images save, and eager bfloat16 is no faster than eager float32
for one image on a CPU, so the CPU rows' one-off pick is the eager float32 reference. Each row names the bench that backs it
(docs/results/); docs/engine.md mirrors the table. A new measurement that changes a winner changes
its row and its file together.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lcmserve.engine.backends.base import AUTO, TORCH_EXECUTED
from lcmserve.engine.kernels.attention import check_attention, suits_small_head
from lcmserve.engine.kernels.build import find_compilers
from lcmserve.errors import InvalidInputError
from lcmserve.models.loading import DTYPES, cpu_has_bfloat16, resolve_device
from lcmserve.models.model import LCMModel
from lcmserve.models.presets import PRESET_PREFIX, get_preset, unet_config
from lcmserve.models.registry import resolve_bundled

logger = logging.getLogger(__name__)

RESULTS = "docs/results/"
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")  # the onnx extra: runtime and the default exporter


@dataclass(frozen=True)
class Machine:
    """What the rule reads of the machine."""

    device_type: str
    """cpu or cuda."""
    cpu_bfloat16: bool = False
    """The CPU computes bfloat16 natively (AVX512-BF16 or AMX on x86); elsewhere it is emulated and slow."""
    cpu_vectors: str = "DEFAULT"
    """torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, ..."""
    compiler: bool = False
    """A C and a C++ compiler: inductor's CPU code and our kernels are built with them."""
    onnx: bool = False
    """The onnx extra is installed (onnx, onnxruntime, onnxscript)."""

    @classmethod
    def probe(cls, device: torch.device) -> Machine:
        if device.type != "cpu":
            return cls(device.type)
        cc, cxx = find_compilers()
        onnx = all(importlib.util.find_spec(name) is not None for name in ONNX_MODULES)
        return cls("cpu", cpu_has_bfloat16(), torch.backends.cpu.get_cpu_capability(), bool(cc and cxx), onnx)


@dataclass(frozen=True)
class Rule:
    """One row of the table: where it applies, what it picks, and the bench that backs it."""

    when: str
    applies: Callable[[Machine, bool], bool]
    """``applies(machine, small_heads)``: small_heads is whether the small-head kernel takes some of the
    model's attention layers."""
    backend: str
    dtype: str
    attention: str
    results: str
    """The file under docs/results/ whose rows show this pick ahead of the others measured there."""
    once: tuple[str, str, str] = ("torch", "float32", "sdpa")
    """Backend, dtype and attention of a one-off run (generate), which pays the start-up without a stream of
    requests; the CPU rows' default is backed by ``ONCE_RESULTS``."""


# Eager float32 against eager bfloat16 + small-head and compiled on one CPU with bfloat16 instructions.
ONCE_RESULTS = "bench-cpu-xeon-amx-bf16.md"


def _cpu(bf16: bool, compiler: bool | None = None, small: bool | None = None) -> Callable[[Machine, bool], bool]:
    """A CPU condition: bfloat16 instructions or not, and when given, a compiler and small heads or not."""
    return lambda m, heads: (m.device_type == "cpu" and m.cpu_bfloat16 == bf16
                             and (compiler is None or m.compiler == compiler) and (small is None or heads == small))


RULES: tuple[Rule, ...] = (
    Rule("a CUDA GPU", lambda m, heads: m.device_type == "cuda",
         "cuda-graph", "float16", "sdpa", "bench-h200-sd15.md", once=("cuda-graph", "float16", "sdpa")),
    Rule("a CPU with bfloat16 instructions, a compiler, heads the small-head kernel takes", _cpu(True, True, True),
         "compiled", "bfloat16", "small-head", "bench-cpu-xeon-amx-bf16.md"),
    Rule("a CPU with bfloat16 instructions and a compiler, larger heads", _cpu(True, True),
         "compiled", "bfloat16", "sdpa", "bench-cpu-zen4-shapes-bf16-vs-fp32.md"),
    Rule("a CPU with AVX2 at most, no bfloat16 instructions, ONNX Runtime installed",
         lambda m, heads: _cpu(False)(m, heads) and m.cpu_vectors in ("AVX2", "DEFAULT") and m.onnx,
         "onnx", "float32", "sdpa", "bench-cpu-shapes.md"),
    Rule("a CPU without bfloat16 instructions, a compiler, heads the small-head kernel takes", _cpu(False, True, True),
         "compiled", "float32", "small-head", "bench-cpu-xeon-shapes.md"),
    Rule("a CPU without bfloat16 instructions and a compiler, larger heads", _cpu(False, True),
         "compiled", "float32", "sdpa", "bench-cpu-zen4-shapes.md"),
    Rule("a CPU with bfloat16 instructions and no compiler", _cpu(True, False),
         "torch", "bfloat16", "sdpa", "bench-cpu-zen4-shapes-bf16-vs-fp32.md"),
    Rule("anything else: eager float32, the reference", lambda m, heads: True,
         "torch", "float32", "sdpa", "bench-cpu-shapes.md"),
)


@dataclass(frozen=True)
class BackendChoice:
    """What ``auto`` picked and why (for the log, ``/v1/models`` and results files)."""

    backend: str
    dtype: str
    attention: str
    reason: str

    def describe(self) -> dict[str, str]:
        return asdict(self)


# -- the model's one fact: its attention heads ------------------------------------------------
def head_dims(model: LCMModel | Mapping[str, Any]) -> tuple[int, ...]:
    """Channels per head of the UNet's attention layers: a loaded model's exactly, a UNet config's as diffusers'
    UNet2DConditionModel builds its blocks (heads per block from ``num_attention_heads``, or the misnamed
    ``attention_head_dim``; head dim = the block's channels / its heads)."""
    if isinstance(model, Mapping):
        return _config_head_dims(model)
    return tuple(sorted({m.inner_dim // m.heads for m in model.unet.modules()
                         if hasattr(m, "processor") and getattr(m, "heads", 0)}))


def _config_head_dims(config: Mapping[str, Any]) -> tuple[int, ...]:
    channels = list(config.get("block_out_channels") or ())
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    kinds = list(config.get("down_block_types") or ())
    dims = {c // h for c, h, kind in zip(channels, heads, kinds) if h and "CrossAttn" in kind}
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if channels and heads and heads[-1] and mid and "CrossAttn" in mid:
        dims.add(channels[-1] // heads[-1])
    return tuple(sorted(dims))


def read_unet_config(spec: str, unet: str | None = None) -> dict[str, Any]:
    """The UNet config of a model spec (or of ``unet``, a UNet that replaces the pipeline's), read without loading
    any weight; {} when it cannot be read here (loading the model then says why)."""
    try:
        source = unet if unet is not None else spec
        if unet is None and spec.startswith(PRESET_PREFIX):
            return unet_config(get_preset(spec))
        folder = Path(source if unet is not None else resolve_bundled(spec)).expanduser()
        for candidate in (folder / "unet" / "config.json", folder / "config.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        if folder.exists():
            return {}
        from diffusers import UNet2DConditionModel

        return dict(UNet2DConditionModel.load_config(source, subfolder=None if unet is not None else "unet"))
    except Exception as exc:  # noqa: BLE001 - the rule then assumes large heads; load_model reports the problem
        logger.debug("backend auto: no UNet config for %s (%s)", unet or spec, exc)
        return {}


# -- the choice --------------------------------------------------------------------------------
def fits(backend: str, device_type: str, dtype: str, attention: str) -> bool:
    """Whether ``backend`` can run what the user fixed (``auto`` fixes nothing)."""
    if attention == "small-head" and backend not in TORCH_EXECUTED:
        return False
    return not (backend == "onnx" and device_type == "cpu" and dtype not in (AUTO, "float32"))


def choose_backend(model: LCMModel | Mapping[str, Any], device: str | torch.device = "auto", dtype: str = AUTO,
                   attention: str = AUTO, *, one_off: bool = False, machine: Machine | None = None) -> BackendChoice:
    """The backend, dtype and attention for ``model`` (a loaded model or its UNet config) on ``device``.

    ``dtype`` and ``attention`` other than auto are the user's and win; ``one_off`` picks for a run that
    ends after its images (generate); ``machine`` replaces the probe (tests)."""
    if dtype != AUTO and dtype not in DTYPES:
        raise InvalidInputError.out_of_range("dtype", dtype, "one of auto, " + ", ".join(DTYPES))
    check_attention(attention)
    device = resolve_device(device) if isinstance(device, str) else device
    machine = machine or Machine.probe(device)
    dims = head_dims(model)
    small = suits_small_head(dims)
    rule = next(r for r in RULES
                if r.applies(machine, small) and fits(r.backend, machine.device_type, dtype, attention))
    backend, rule_dtype, rule_attention = rule.once if one_off else (rule.backend, rule.dtype, rule.attention)
    choice = BackendChoice(backend, rule_dtype if dtype == AUTO else dtype,
                           rule_attention if attention == AUTO else attention,
                           _reason(rule, dims, dtype, attention, one_off))
    logger.info("backend auto: %s, %s, %s attention: %s", choice.backend, choice.dtype, choice.attention,
                choice.reason)
    return choice


def _reason(rule: Rule, dims: tuple[int, ...], dtype: str, attention: str, one_off: bool) -> str:
    heads = f"head dims {', '.join(map(str, dims))}" if dims else "head dims unknown"
    parts = [f"{rule.when} ({heads}): {rule.backend}, {rule.dtype}, {rule.attention} "
             f"(measured: {RESULTS}{rule.results})"]
    if one_off and rule.once != (rule.backend, rule.dtype, rule.attention):
        parts.append(f"a one-off run takes {', '.join(rule.once)}: compiling costs more start-up than a few images "
                     f"save (measured: {RESULTS}{ONCE_RESULTS}; --backend {rule.backend} compiles)")
    parts += [f"{name} {value} as given" for name, value in (("dtype", dtype), ("attention", attention))
              if value != AUTO]
    return "; ".join(parts)


def choose_before_load(spec: str, *, unet: str | None = None, device: str = "auto", dtype: str = AUTO,
                       attention: str = AUTO, one_off: bool = False) -> BackendChoice:
    """``choose_backend`` for a model not loaded yet (``spec`` and ``unet`` as ``load_model`` takes them), so that
    it loads in the chosen dtype."""
    return choose_backend(read_unet_config(spec, unet), device, dtype, attention, one_off=one_off)


def auto_attention(backend: str, model: LCMModel, machine: Machine | None = None) -> str:
    """``attention=auto`` beside a named backend: small-head where that backend runs torch's modules on a CPU with a
    compiler and the kernel takes some of the model's layers; sdpa elsewhere."""
    machine = machine or Machine.probe(model.device)
    takes = (backend in TORCH_EXECUTED and machine.device_type == "cpu" and machine.compiler
             and suits_small_head(head_dims(model)))
    return "small-head" if takes else "sdpa"


def rules_markdown() -> str:
    """The table as docs/engine.md shows it (a test keeps the two the same)."""
    lines = ["| # | when | backend | dtype | attention | one-off run | backed by |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(RULES, 1):
        lines.append(f"| {i} | {r.when} | `{r.backend}` | {r.dtype} | {r.attention} | `{r.once[0]}`, "
                     f"{r.once[1]}, {r.once[2]} | "
                     f"[{r.results}](results/{r.results}) |")
    return "\n".join(lines) + "\n"

