"""LoRA adapters held unfused beside the base weights, and batches whose rows use different ones.

A LoRA adds ``s * B A x`` to a layer's output (Hu et al. 2021, eq. 3), with ``s = alpha / r``.
Fusing it (``W + s B A``) serves one adapter per model; holding the factors apart lets every row
of a batch choose its own set of adapters and scales, as S-LoRA and punica do for language models.

For one batch, each targeted layer gets a forward hook that adds the grouped low-rank product of
the batch's active adapters: their A factors stacked along the rank axis, one shared product
``x A_cat^T``, each rank column scaled by its row's weight for that adapter, then ``B_cat``. Rows
that use no adapter are left out of that product. Hooks (not wrapper modules) keep the UNet's
module tree and state dict untouched, and they exist only while a batch that uses adapters runs:
a batch without adapters runs the UNet exactly as it is.

Files are read and their keys converted with diffusers' own LoRA loader (the code behind
``load_lora_weights``) and scaled with peft's rank/alpha patterns, so an adapter means here what it
means to ``set_adapters``. Only the UNet's Linear and Conv2d layers can be targeted, as peft does.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lcmserve.consistency import cfg_batch
from lcmserve.engine.request import AdapterItems
from lcmserve.errors import InvalidInputError, ModelLoadError
from lcmserve.models.model import LCMModel
from lcmserve.models.registry import resolve_bundled

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
UNET_PREFIX = "unet."
REMOVE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class LowRank:
    """One layer's factors of one adapter: ``down`` A [r, in] (or [r, in, kh, kw] for a conv) and ``up``
    B [out, r] (or [out, r, 1, 1]) with the adapter's alpha/r already folded in."""

    down: torch.Tensor
    up: torch.Tensor


@dataclass
class Adapter:
    """A loaded adapter: where it came from and its factors per UNet module path."""

    name: str
    path: str
    factors: dict[str, LowRank]
    scale: float = 1.0
    """Multiplies every row's scale for this adapter (as ``--lora-scale`` does for a fused LoRA)."""
    pins: int = field(default=0, repr=False)
    """How many holders use it (requests admitted but not finished, running batches); ``remove`` waits for zero."""
    removing: bool = field(default=False, repr=False)
    """Being removed: new requests can no longer choose it, those that hold it still run with it."""

    def describe(self) -> dict:
        ranks = sorted({int(f.down.shape[0]) for f in self.factors.values()})
        return {"name": self.name, "path": self.path, "scale": self.scale, "modules": len(self.factors),
                "ranks": ranks}


# -- reading a file ------------------------------------------------------------------------------
def read_lora_state(path: str, unet_config) -> tuple[dict[str, torch.Tensor], object]:
    """The UNet part of a LoRA file in peft's key format, and its peft ``LoraConfig`` (rank and alpha).

    diffusers' ``lora_state_dict`` reads diffusers, peft and kohya/A1111 layouts (the same code as
    ``load_lora_weights``); safetensors only, so a file sent at run time never runs pickle."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        path, unet_config=unet_config, use_safetensors=True, return_lora_metadata=True)
    others = sorted({key.split(".")[0] for key in state if not key.startswith(UNET_PREFIX)})
    if others:
        raise ValueError(f"it holds layers for {', '.join(others)}; a per-request adapter may change the UNet only "
                         "(fuse a text-encoder LoRA at load with --lora)")
    state = {key.removeprefix(UNET_PREFIX): value for key, value in state.items()}
    if not state:
        raise ValueError("it holds no UNet LoRA layers")
    if any(".lora_A." not in key and ".lora_B." not in key for key in state):
        # diffusers' own save format (lora.down/lora.up), possibly mixed with peft's names in one file
        state = convert_unet_state_dict_to_peft(state)
    if metadata is not None:
        metadata = {k.removeprefix(UNET_PREFIX): v for k, v in metadata.items() if k.startswith(UNET_PREFIX)}
        return state, LoraConfig(**metadata)
    alphas = {k.removeprefix(UNET_PREFIX): v for k, v in (alphas or {}).items() if k.startswith(UNET_PREFIX)}
    ranks = {f"^{key}": value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim > 1}
    return state, LoraConfig(**get_peft_kwargs(ranks, alphas, state, is_unet=True))


def layer_scaling(config, module_path: str) -> tuple[int, float]:
    """(r, alpha / r) of one layer under peft's rank/alpha patterns (alpha / sqrt(r) with rsLoRA)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_path), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_path), config.lora_alpha)
    return r, alpha / (math.sqrt(r) if config.use_rslora else r)


def _check_factors(path: str, module: torch.nn.Module | None, down: torch.Tensor, up: torch.Tensor, r: int) -> None:
    """Raise ValueError unless ``down``/``up`` fit ``module`` as peft's LoRA of rank r would."""
    if module is None:
        raise ValueError(f"it targets {path}, which this UNet lacks: a LoRA for another architecture")
    if isinstance(module, torch.nn.Linear):
        want_down, want_up = (r, module.in_features), (module.out_features, r)
    elif isinstance(module, torch.nn.Conv2d) and module.groups == 1:
        want_down, want_up = (r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)
    else:
        raise ValueError(f"it targets {path}, a {type(module).__name__}; adapters may target Linear and "
                         "ungrouped Conv2d layers only")
    # A linear LoRA on a 1x1 conv (and back) is stored either way; compare element layout, not rank of the array.
    if down.numel() != math.prod(want_down) or up.numel() != math.prod(want_up) or down.shape[0] != r:
        raise ValueError(f"its factors for {path} have shapes {tuple(down.shape)} and {tuple(up.shape)}; this UNet "
                         f"needs {want_down} and {want_up}: a LoRA for another architecture")


def lora_factors(state: dict[str, torch.Tensor], config, modules: dict[str, torch.nn.Module],
                 dtype: torch.dtype, device: torch.device) -> dict[str, LowRank]:
    """Per-module factors, checked against the UNet's layers, B scaled by alpha/r, on the model's device."""
    if any("lora_magnitude_vector" in key for key in state) or config.use_dora:
        raise ValueError("it is a DoRA adapter; per-request adapters take plain LoRA")
    unexpected = [key for key in state if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unexpected:
        raise ValueError(f"it holds keys other than LoRA factors (e.g. {unexpected[0]}); LoRA biases and other "
                         "layer kinds are not supported per request")
    factors = {}
    for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
        path = key.removesuffix(".lora_A.weight")
        up_key = f"{path}.lora_B.weight"
        if up_key not in state:
            raise ValueError(f"it has lora_A but no lora_B for {path}")
        module = modules.get(path)
        r, scaling = layer_scaling(config, path)
        down, up = state[key], state[up_key]
        _check_factors(path, module, down, up, r)
        shape = (r, module.in_features) if isinstance(module, torch.nn.Linear) else (r, module.in_channels,
                                                                                       *module.kernel_size)
        up = up.float().reshape(up.shape[0], r) * scaling
        if isinstance(module, torch.nn.Conv2d):
            up = up.reshape(*up.shape, 1, 1)
        factors[path] = LowRank(down.reshape(shape).to(device, dtype), up.to(device, dtype))
    return factors


# -- one batch -----------------------------------------------------------------------------------
class BatchPlan:
    """The active adapters of one batch and each row's weight for each; builds per-layer stacks on first use.

    ``weights`` is [rows, n_active] (a row's scale times the adapter's own scale, 0 where a row does not use
    it). Rows with no adapter at all are left out of the low-rank product through ``row_index``."""

    def __init__(self, adapters: Sequence[Adapter], weights: torch.Tensor) -> None:
        self.adapters = tuple(adapters)
        self.rows = weights.shape[0]
        self.row_weights = weights
        used = weights.ne(0).any(dim=1)
        self.row_index = None if bool(used.all()) else used.nonzero().flatten()
        self.weights = weights if self.row_index is None else weights[self.row_index]
        self._stacks: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def targets(self) -> set[str]:
        return {path for adapter in self.adapters for path in adapter.factors}

    def stack(self, path: str, copies: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat, column weights [used rows * copies, R]) of one layer; copies=2 for the doubled CFG batch."""
        key = (path, copies)
        if key not in self._stacks:
            downs, ups, columns = [], [], []
            for a, adapter in enumerate(self.adapters):
                factors = adapter.factors.get(path)
                if factors is not None:
                    downs.append(factors.down)
                    ups.append(factors.up)
                    columns.append(self.weights[:, a : a + 1].expand(-1, factors.down.shape[0]))
            down, up = torch.cat(downs), torch.cat(ups, dim=1)
            column = torch.cat(columns, dim=1).to(down.device, down.dtype)
            # The doubled CFG batch repeats every row: both halves carry the row's adapters.
            self._stacks[key] = (down, up, column if copies == 1 else cfg_batch(column, column))
        return self._stacks[key]

    def per_row(self, path: str, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rows * copies, in, K], B [rows * copies, K, out]) of one Linear layer: each row's own factors.

        A row's adapters sit side by side along K (one slot of this layer's largest rank per adapter, as many
        slots as the row with the most adapters uses), its weights folded into A; a slot a row does not use,
        and every slot of a row without adapters, is zeros. So one batched product per factor serves rows with
        different adapters, each row doing its own rank's work rather than every adapter's."""
        key = ("per-row", path, copies)
        if key not in self._stacks:
            present = [(a, adapter.factors[path]) for a, adapter in enumerate(self.adapters) if path in adapter.factors]
            first = present[0][1]
            rank = max(f.down.shape[0] for _, f in present)
            n = len(self.adapters)
            downs = first.down.new_zeros(n + 1, rank, first.down.shape[1])  # index n: no adapter
            ups = first.up.new_zeros(n + 1, first.up.shape[0], rank)
            for a, factors in present:
                downs[a, : factors.down.shape[0]] = factors.down
                ups[a, :, : factors.up.shape[1]] = factors.up
            used = self.row_weights.ne(0)
            slots = max(1, int(used.sum(dim=1).max()))
            order = used.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :slots]  # used ones first
            weight = self.row_weights.gather(1, order)
            index = torch.where(weight != 0, order, n).to(downs.device)
            rows = self.rows
            a_rows = (downs[index] * weight.to(downs.device, downs.dtype)[..., None, None])  # [rows, slots, r, in]
            a_rows = a_rows.reshape(rows, slots * rank, -1).transpose(1, 2)
            b_rows = ups[index].transpose(2, 3).reshape(rows, slots * rank, -1)  # [rows, slots * r, out]
            if copies == 2:  # the doubled CFG batch repeats every row: both halves carry the row's adapters
                a_rows, b_rows = cfg_batch(a_rows, a_rows), cfg_batch(b_rows, b_rows)
            self._stacks[key] = (a_rows.contiguous(), b_rows.contiguous())
        return self._stacks[key]

    def rows_of(self, copies: int, device: torch.device) -> torch.Tensor | None:
        if self.row_index is None:
            return None
        index = self.row_index if copies == 1 else cfg_batch(self.row_index, self.row_index + self.rows)
        return index.to(device)


def low_rank_delta(module: torch.nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                   column: torch.Tensor) -> torch.Tensor:
    """sum_a w[row, a] B_a A_a x for every row at once: one product with the stacked factors."""
    if isinstance(module, torch.nn.Conv2d):
        # peft's conv LoRA: A is a conv with the layer's kernel, stride and padding; B a 1x1 conv.
        hidden = F.conv2d(x, down, stride=module.stride, padding=module.padding)
        return F.conv2d(hidden * column[:, :, None, None], up)
    hidden = x @ down.T
    return (hidden * column.view(column.shape[0], *([1] * (hidden.ndim - 2)), -1)) @ up.T


# -- the set of loaded adapters ---------------------------------------------------------------
class AdapterSet:
    """Adapters held beside one model's UNet, applied per row for the duration of a batch.

    ``load``/``remove`` may run on another thread than the batches (a server's admin call). A server
    ``hold``s a request's adapters from its admission until it ends, so that a removal waits for the
    requests still queued as well as for the running batch: an adapter being removed is refused to new
    requests at once, stays usable by the requests that hold it, and is dropped when the last one ends."""

    def __init__(self, model: LCMModel) -> None:
        self.model = model
        self._modules = dict(model.unet.named_modules())
        self._adapters: dict[str, Adapter] = {}
        self._changed = threading.Condition()
        self._run_lock = threading.Lock()  # one batch with adapters at a time on this UNet
        self._plan: BatchPlan | None = None

    # -- loading ---------------------------------------------------------------------------------
    def load(self, name: str, path: str, scale: float = 1.0) -> Adapter:
        """Read a diffusers/peft LoRA (a .safetensors file, its folder, or a bundled LoRA's name) as ``name``."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidInputError.out_of_range(
                "name", name, "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidInputError.out_of_range("scale", scale, "a finite number")
        with self._changed:
            self._check_free(name)
        source = resolve_bundled(str(path), kind="lora", param="path")
        if not Path(source).expanduser().exists():
            raise ModelLoadError(f"path: adapter {name!r}: {str(path)!r} does not exist", param="path")
        try:
            state, config = read_lora_state(str(Path(source).expanduser()), self.model.unet.config)
            factors = lora_factors(state, config, self._modules, self.model.dtype, self.model.device)
        except Exception as exc:  # diffusers and safetensors raise many kinds for a bad file
            raise ModelLoadError(f"path: adapter {name!r} could not be loaded from {str(path)!r}: {exc}",
                                 param="path") from exc
        adapter = Adapter(name, str(path), factors, float(scale))
        with self._changed:
            self._check_free(name)  # a concurrent load of the same name may have won
            self._adapters[name] = adapter
        return adapter

    def _check_free(self, name: str) -> None:
        adapter = self._adapters.get(name)
        if adapter is not None and adapter.removing:
            raise InvalidInputError(f"name: the adapter {name!r} is being removed, once the requests that use it "
                                    "end; load it again after that, or choose another name", param="name")
        if adapter is not None:
            raise InvalidInputError(f"name: an adapter {name!r} is already loaded; remove it first", param="name")

    def remove(self, name: str, timeout_s: float = REMOVE_TIMEOUT_S) -> None:
        """Unload ``name``: new requests can no longer choose it at once; waits until those that hold it (queued
        or running) and the batches using it have ended, then drops it."""
        with self._changed:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.removing:
                raise self.unknown(name)
            adapter.removing = True
            if not self._changed.wait_for(lambda: adapter.pins == 0, timeout=timeout_s):
                adapter.removing = False
                raise TimeoutError(f"adapter {name!r} was still in use after {timeout_s} s; it stays loaded")
            del self._adapters[name]

    def removing(self, name: str) -> bool:
        """Whether ``name`` is being removed: refused to new requests, still held by some."""
        with self._changed:
            adapter = self._adapters.get(name)
            return adapter is not None and adapter.removing

    def _loaded(self) -> list[str]:
        return sorted(name for name, adapter in self._adapters.items() if not adapter.removing)

    def names(self) -> list[str]:
        """The adapters new requests may choose (not those being removed)."""
        with self._changed:
            return self._loaded()

    def describe(self) -> list[dict]:
        with self._changed:
            return [self._adapters[name].describe() for name in self._loaded()]

    # -- checks and holds ------------------------------------------------------------------------
    def unknown(self, name: str) -> InvalidInputError:
        loaded = ", ".join(self._loaded()) or "none"
        return InvalidInputError(f"adapters: no adapter named {name!r} is loaded; loaded: {loaded}", param="adapters")

    def check(self, names) -> None:
        """Raise InvalidInputError naming the first of ``names`` that cannot run, and listing those that are loaded.

        One being removed can still run: the rows that reach the engine with it were admitted before (``hold``)."""
        with self._changed:
            for name in names:
                if name not in self._adapters:
                    raise self.unknown(name)

    def hold(self, names) -> tuple[Adapter, ...]:
        """Keep ``names`` from being dropped until ``release``: a request holds its adapters from admission to its
        end. InvalidInputError for a name not loaded or being removed, as for a new request."""
        with self._changed:
            for name in names:
                adapter = self._adapters.get(name)
                if adapter is None or adapter.removing:
                    raise self.unknown(name)
            held = tuple(self._adapters[name] for name in names)
            for adapter in held:
                adapter.pins += 1
        return held

    def release(self, held: Sequence[Adapter]) -> None:
        """End a ``hold``; a removal waiting for these adapters goes on once nothing holds them."""
        self._unpin(held)

    # -- running ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, row_adapters: Sequence[AdapterItems]) -> Iterator[BatchPlan | None]:
        """Apply each row's adapters to the UNet while the block runs; a batch without any runs it untouched."""
        if not any(row_adapters):
            yield None
            return
        with self._run_lock:
            adapters, weights = self._pin(row_adapters)
            plan = BatchPlan(adapters, weights)
            handles = []
            try:
                for path in sorted(plan.targets()):
                    handles.append(self._modules[path].register_forward_hook(self._hook(path)))
                self._plan = plan
                yield plan
            finally:
                self._plan = None
                for handle in handles:
                    handle.remove()
                self._unpin(adapters)

    def _pin(self, row_adapters: Sequence[AdapterItems]) -> tuple[list[Adapter], torch.Tensor]:
        with self._changed:
            names = sorted({name for items in row_adapters for name, _ in items})
            for name in names:
                if name not in self._adapters:
                    raise self.unknown(name)
            adapters = [self._adapters[name] for name in names]
            for adapter in adapters:
                adapter.pins += 1
        column = {name: a for a, name in enumerate(names)}
        weights = torch.zeros(len(row_adapters), len(adapters), dtype=torch.float32)
        for row, items in enumerate(row_adapters):
            for name, scale in items:
                weights[row, column[name]] = scale * adapters[column[name]].scale
        return adapters, weights

    def _unpin(self, adapters: Sequence[Adapter]) -> None:
        with self._changed:
            for adapter in adapters:
                adapter.pins -= 1
            self._changed.notify_all()

    def _hook(self, path: str):
        def add_low_rank(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None:
                return None
            x = args[0]
            copies = x.shape[0] // plan.rows
            assert copies in (1, 2) and x.shape[0] == copies * plan.rows, (
                f"{path}: {x.shape[0]} rows for a batch of {plan.rows}")
            if isinstance(module, torch.nn.Linear) and x.dtype == output.dtype == module.weight.dtype:
                # Per-row gather (measured faster than the stacked product below: docs/engine.md): each row
                # multiplies by its own factors, added into the layer's output in place.
                a_rows, b_rows = plan.per_row(path, copies)
                out = output.view(output.shape[0], -1, output.shape[-1])
                out.baddbmm_(torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a_rows), b_rows)
                return output
            down, up, column = plan.stack(path, copies)
            index = plan.rows_of(copies, x.device)
            if index is None:
                return output + low_rank_delta(module, x.to(down.dtype), down, up, column).to(output.dtype)
            delta = low_rank_delta(module, x.index_select(0, index).to(down.dtype), down, up, column)
            return output.index_add(0, index, delta.to(output.dtype))

        return add_low_rank


__all__ = ["Adapter", "AdapterItems", "AdapterSet", "BatchPlan", "LowRank", "low_rank_delta", "read_lora_state"]
