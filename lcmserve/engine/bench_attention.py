"""``lcmserve bench attention``: our small-head CPU kernel against torch's SDPA, shape by shape.

Two sets of shapes: the attention calls of a model's UNet (recorded from one forward pass, so the
table names what the model really runs), and a sweep of head dims at a fixed query count over a
long and a short key sequence, which is where ``MAX_HEAD_DIM`` and ``FEW_KEYS`` in
engine/kernels/attention.py come from. Each shape is timed in both
dtypes, the two implementations taking turns call by call, and checked against a float64
reference. JSON + markdown + a PNG of the speed-ups.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lcmserve.engine.bench import environment, write_report
from lcmserve.engine.kernels import attention as kernel
from lcmserve.errors import InvalidInputError, check_int

SWEEP_HEAD_DIMS = (4, 8, 12, 16, 24, 32)
SWEEP_TOKENS = 256
SWEEP_KEYS = (256, 77)  # self-attention over the queries; cross-attention over an SD-length prompt
SWEEP_CHANNELS = 64  # heads = channels / head dim, as a UNet level of fixed width would split them


@dataclass
class AttentionBenchConfig:
    model: str = "shapes-lcm"
    """Model whose UNet's attention shapes are benched."""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    iters: int = 20
    """Timed calls per shape and implementation (median reported)."""
    threads: int | None = None
    cache_dir: str | None = None
    out: str = "docs/results"
    name: str = "attention-cpu"

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(not 1 <= b <= 256 for b in self.batch_sizes):
            raise InvalidInputError.out_of_range("batch_sizes", list(self.batch_sizes), "integers in [1, 256]")
        names = [str(d).removeprefix("torch.") for d in kernel.KERNEL_DTYPES]
        for dtype in self.dtypes:
            if dtype not in names:
                raise InvalidInputError.out_of_range("dtypes", dtype, "each one of " + ", ".join(names))
        check_int("iters", self.iters, 1, 1000)


def unet_attention_shapes(model) -> Counter:
    """(query tokens, key tokens, heads, head dim) of every attention call in one UNet forward, counted."""
    seen: Counter = Counter()
    unet = model.unet

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        n_key = hidden.shape[1] if context is None else context.shape[1]
        seen[(hidden.shape[1], n_key, module.heads, module.inner_dim // module.heads)] += 1

    attns = [m for m in unet.modules() if hasattr(m, "processor") and hasattr(m, "heads")]
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in attns]
    try:
        size = model.native_size // model.vae_scale_factor
        cfg = unet.config
        with torch.inference_mode():
            unet(torch.zeros(1, cfg.in_channels, size, size, dtype=model.dtype), 500,
                 encoder_hidden_states=torch.zeros(1, model.tokenizers[0].model_max_length, cfg.cross_attention_dim,
                                                   dtype=model.dtype),
                 timestep_cond=None if cfg.time_cond_proj_dim is None else
                 torch.zeros(1, cfg.time_cond_proj_dim, dtype=model.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _time_pair(q, k, v, iters: int) -> tuple[float, float]:
    """Median ms of SDPA and of the kernel, taking turns call by call."""
    sdpa_ms, ours_ms = [], []
    for i in range(iters + 2):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        middle = time.perf_counter()
        kernel.small_head_attention(q, k, v)
        end = time.perf_counter()
        if i >= 2:  # two warm-up rounds
            sdpa_ms.append((middle - start) * 1000)
            ours_ms.append((end - middle) * 1000)
    return float(np.median(sdpa_ms)), float(np.median(ours_ms))


def bench_shape(shape: tuple[int, int, int, int], batch: int, dtype: torch.dtype, iters: int) -> dict[str, Any]:
    n_query, n_key, heads, head_dim = shape
    gen = torch.Generator().manual_seed(0)

    def view(tokens: int) -> torch.Tensor:  # as diffusers hands it over: [B, N, H*D] seen as [B, H, N, D]
        x = torch.randn(batch, tokens, heads * head_dim, generator=gen).to(dtype)
        return x.view(batch, tokens, heads, head_dim).transpose(1, 2)

    q, k, v = view(n_query), view(n_key), view(n_key)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    sdpa_err = (F.scaled_dot_product_attention(q, k, v).transpose(1, 2).double() - exact).abs().max().item()
    ours_err = (kernel.small_head_attention(q, k, v).double() - exact).abs().max().item()
    sdpa_ms, ours_ms = _time_pair(q, k, v, iters)
    return {"query_tokens": n_query, "key_tokens": n_key, "heads": heads, "head_dim": head_dim, "batch_size": batch,
            "dtype": str(dtype).removeprefix("torch."), "sdpa_ms": round(sdpa_ms, 4), "kernel_ms": round(ours_ms, 4),
            "speedup": round(sdpa_ms / ours_ms, 3), "sdpa_max_error": sdpa_err, "kernel_max_error": ours_err,
            "takes_kernel": kernel.head_dim_takes(head_dim, n_key)}


def run_attention_bench(cfg: AttentionBenchConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from lcmserve.models import load_model

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    kernel.load_kernel(cfg.cache_dir)
    model = load_model(cfg.model, device="cpu", dtype="float32")
    model_shapes = unet_attention_shapes(model)
    sweep = [(SWEEP_TOKENS, keys, SWEEP_CHANNELS // d, d) for keys in SWEEP_KEYS for d in SWEEP_HEAD_DIMS]
    jobs = [(set_name, shape, batch, dtype) for set_name, shapes in (("model", list(model_shapes)), ("sweep", sweep))
            for shape in shapes for batch in cfg.batch_sizes for dtype in cfg.dtypes]
    rows = []
    for set_name, shape, batch, dtype in tqdm(jobs, desc="attention bench", unit="shape"):
        row = bench_shape(shape, batch, getattr(torch, dtype), cfg.iters)
        row.update(set=set_name, calls_per_unet=model_shapes.get(shape, 0) if set_name == "model" else None)
        rows.append(row)
    result = {"config": asdict(cfg), "environment": environment(torch.device("cpu")), "rows": rows}
    write_report(result, Path(cfg.out), cfg.name, _markdown(result), lambda path: _plot(result, path))
    return result


def _markdown(result: dict[str, Any]) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"# lcmserve bench attention: {cfg['model']}\n",
             f"- device: {env['device']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}",
             f"- date: {env['date']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             (f"- median of {cfg['iters']} calls per shape, SDPA and the kernel taking turns; inputs are [B, N, H*D] "
              "projections seen as [B, H, N, D], as diffusers passes them; errors against float64\n")]
    for set_name, title in (("model", f"The attention calls of {cfg['model']}'s UNet (one forward)"),
                            ("sweep", (f"Head dims at {SWEEP_TOKENS} query tokens over "
                                       f"{' and '.join(map(str, SWEEP_KEYS))} keys, {SWEEP_CHANNELS} channels"))):
        lines += [f"## {title}\n", ("| tokens (q x k) | heads x dim | calls | batch | dtype | SDPA ms | kernel ms | "
                                     "speed-up | SDPA err | kernel err | kernel used |"), "|" + "---|" * 11]
        for r in (r for r in result["rows"] if r["set"] == set_name):
            lines.append(f"| {r['query_tokens']} x {r['key_tokens']} | {r['heads']} x {r['head_dim']} | "
                         f"{r['calls_per_unet'] if r['calls_per_unet'] is not None else '-'} | {r['batch_size']} | "
                         f"{r['dtype']} | {r['sdpa_ms']:.3f} | {r['kernel_ms']:.3f} | {r['speedup']:.2f} | "
                         f"{r['sdpa_max_error']:.1e} | {r['kernel_max_error']:.1e} | "
                         f"{'yes' if r['takes_kernel'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in result["rows"] if r["set"] == "sweep"]
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for (keys, batch, dtype) in sorted({(r["key_tokens"], r["batch_size"], r["dtype"]) for r in sweep}, reverse=True):
        pts = sorted((r["head_dim"], r["speedup"]) for r in sweep
                     if (r["key_tokens"], r["batch_size"], r["dtype"]) == (keys, batch, dtype))
        colour = colours.setdefault((batch, dtype), f"C{len(colours)}")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour,
                linestyle="-" if keys == SWEEP_KEYS[0] else "--", label=f"{keys} keys, batch {batch}, {dtype}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(f"head dim ({SWEEP_TOKENS} query tokens, {SWEEP_CHANNELS} channels)")
    ax.set_ylabel("SDPA time / kernel time")
    ax.set_title("small-head attention kernel vs torch SDPA (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
