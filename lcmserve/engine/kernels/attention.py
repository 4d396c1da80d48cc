"""Small-head attention on a CPU: our C kernel, built on first use, as a torch op and a diffusers processor.

Why our own kernel: PyTorch's CPU flash attention tiles the work into GEMMs whose inner dimension is
the head dimension. With a few channels per head (the shapes UNet splits 32 channels into 8 heads)
those GEMMs do almost nothing per call, and at large batches that one layer type dominates the
UNet's time. ``small_head_attention.c`` puts a block of query rows in the lanes of a vector register
and streams each head's keys through scores, exp and the weighted sum of V, so nothing is reduced
across lanes, which is what small heads need (measured against ``scaled_dot_product_attention`` by
`lcmserve bench attention`: docs/results/attention-cpu-zen4.md). Neither diffusers, xformers (CPU)
nor ONNX Runtime has a kernel for this case.

The kernel is the CPU implementation of the operator ``lcmserve::small_head_attention``, registered
from C++ (``small_head_attention_op.cpp``) so that torch.compile's C++ wrapper calls it directly. Both
files are compiled with the system's C and C++ compilers for this CPU and cached like an ONNX graph
(see ``build.py``). It runs on PyTorch's own OpenMP threads.

Opt-in (``--attention small-head``): the torch, compiled and cuda-graph backends on a CPU route their
UNet's plain attention layers through it; anything else (a mask, a GPU tensor, a large head, autograd)
goes to diffusers' ``AttnProcessor2_0`` unchanged.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from lcmserve.engine.kernels.build import KERNEL_DTYPES, KernelSource, build_library, is_loaded, load_library
from lcmserve.errors import InvalidInputError

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("sdpa", "small-head")
# "auto": small-head where the kernel takes some of the model's layers and the backend runs torch's
# modules on a CPU, else sdpa (engine/backends/auto.py decides).
ATTENTION_CHOICES = ("auto", *ATTENTION_MODES)
SOURCE = Path(__file__).with_name("small_head_attention.c")
OP_SOURCE = Path(__file__).with_name("small_head_attention_op.cpp")
LIBRARY = "small_head_attention.so"
# Head dims that take the kernel, from `lcmserve bench attention` (docs/results/attention-cpu-zen4.md):
# up to 16 channels it beats SDPA at any length; at 24 only over a few keys (text tokens, a small
# latent), where SDPA's per-tile overhead dominates; from 32 on SDPA's GEMMs win.
MAX_HEAD_DIM = 16
FEW_KEYS, FEW_KEYS_MAX_HEAD_DIM = 80, 24


def check_attention(mode: str) -> str:
    if mode not in ATTENTION_CHOICES:
        raise InvalidInputError.out_of_range("attention", mode, "one of " + ", ".join(ATTENTION_CHOICES))
    return mode


# 1. build and load ----------------------------------------------------------------------------
KERNEL = KernelSource("small-head-attention", SOURCE, OP_SOURCE, LIBRARY, param="attention",
                      purpose="the small-head kernel", instead="use --attention sdpa")


def build_kernel(cache_dir: str | os.PathLike | None = None) -> Path:
    """The kernel's shared library, compiled now if the cache has no intact copy."""
    return build_library(KERNEL, cache_dir)


def load_kernel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (if needed) and load the kernel, once per process; returns the loaded library."""
    return load_library(KERNEL, cache_dir)


# 2. the op --------------------------------------------------------------------------------------
# The schema and the fake kernel (for torch.compile's tracing) live here; the CPU kernel comes with
# the library. The op is opaque to torch.compile, which calls it as it is.
torch.library.define("lcmserve::small_head_attention", "(Tensor query, Tensor key, Tensor value) -> Tensor")


@torch.library.register_fake("lcmserve::small_head_attention")
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch, heads, n_query, head_dim = query.shape
    return query.new_empty(batch, n_query, heads, head_dim)


def small_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for [B, H, N, D] CPU tensors (float32 or bfloat16); returns [B, Nq, H, D].

    The output is laid out as the output projection reads it. Needs ``load_kernel()`` first."""
    if not is_loaded(KERNEL):
        raise RuntimeError("small_head_attention: the kernel is not loaded; call load_kernel() first")
    return torch.ops.lcmserve.small_head_attention(query, key, value)


# 3. the processor --------------------------------------------------------------------------------
def head_dim_takes(head_dim: int, n_key: int) -> bool:
    """Whether heads of ``head_dim`` channels over ``n_key`` keys run faster in the kernel than in SDPA."""
    return head_dim <= MAX_HEAD_DIM or (head_dim <= FEW_KEYS_MAX_HEAD_DIM and n_key <= FEW_KEYS)


def suits_small_head(head_dims) -> bool:
    """Whether a UNet with attention heads of these sizes gains from the kernel: some layer's heads are small
    enough for it at any key count (the others fall back to SDPA per call, at no cost)."""
    return any(0 < d <= MAX_HEAD_DIM for d in head_dims)


def kernel_takes(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> bool:
    """Whether this layer and input are the plain case the kernel covers (checked per call)."""
    head_dim = attn.inner_dim // attn.heads
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    return (
        hidden_states.ndim == 3 and context.ndim == 3 and hidden_states.device.type == "cpu"
        and head_dim_takes(head_dim, context.shape[1]) and hidden_states.dtype in KERNEL_DTYPES
        and getattr(attn, "inner_kv_dim", attn.inner_dim) == attn.inner_dim
        and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
        and not attn.residual_connection
        and not (torch.is_grad_enabled() and (hidden_states.requires_grad or attn.to_q.weight.requires_grad))
    )


class SmallHeadAttnProcessor(AttnProcessor2_0):
    """diffusers' AttnProcessor2_0 with ``small_head_attention`` in place of SDPA for the plain case.

    Like AttnProcessor2_0 it scales scores by 1/sqrt(head dim) (attn.scale is not consulted)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None or args or kwargs or not kernel_takes(attn, hidden_states, encoder_hidden_states):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        head_dim = attn.inner_dim // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = torch.ops.lcmserve.small_head_attention(
            heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context)))
        out = attn.to_out[1](attn.to_out[0](out.reshape(batch, -1, attn.heads * head_dim)))
        return out / attn.rescale_output_factor


def use_small_head_attention(model, cache_dir: str | os.PathLike | None = None) -> int:
    """Load the kernel and give the UNet's default (SDPA) attention layers the small-head processor.

    Layers with another processor (IP-Adapter, a custom one) keep it. Returns how many layers have a
    head dim the kernel takes over some key count (float32 or bfloat16; the others fall back per call)."""
    load_kernel(cache_dir)
    unet = model.unet
    current = unet.attn_processors
    fresh = any(type(p) is AttnProcessor2_0 for p in current.values())
    if fresh:
        unet.set_attn_processor({name: SmallHeadAttnProcessor() if type(p) is AttnProcessor2_0 else p
                                 for name, p in current.items()})
    limit = FEW_KEYS_MAX_HEAD_DIM if model.dtype in KERNEL_DTYPES else 0
    layers = [m for m in unet.modules() if isinstance(getattr(m, "processor", None), SmallHeadAttnProcessor)]
    taking = sum(m.inner_dim // m.heads <= limit for m in layers)
    logger.log(logging.INFO if fresh else logging.DEBUG,
               "small-head attention: %d of %d attention layers take the kernel (head dim <= %d, or <= %d over "
               "at most %d keys, in %s)", taking, len(current), min(limit, MAX_HEAD_DIM), limit, FEW_KEYS,
               model.dtype_name)
    return taking


def with_standard_attention(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself, or when it routes attention through our kernel, a copy that shares its weights
    (no memory) with diffusers' SDPA processors: for the ONNX exporter and diffusers' own pipeline."""
    if not any(isinstance(m.processor, SmallHeadAttnProcessor) for m in module.modules() if hasattr(m, "processor")):
        return module
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    twin = copy.deepcopy(module, memo=shared)
    twin.set_attn_processor({name: AttnProcessor2_0() if isinstance(p, SmallHeadAttnProcessor) else p
                             for name, p in twin.attn_processors.items()})
    return twin
