"""``lcmserve bench adapters``: rows over several LoRA adapters in one batch, against the alternatives.

Three ways of running the same number of rows, taking turns batch by batch so that the machine's
drift hits all of them alike:

- mixed: every adapter's rows in one batch, through ``AdapterSet`` (one UNet call per step, the
  adapters' grouped low-rank products added by hooks);
- fused: as many rows under one adapter fused into a copy of the UNet's weights (``W + s B A``), no
  adapter at run time: what a server that serves one style does;
- separate: each adapter's rows as a batch of their own, one after the other: what a batcher that
  splits by adapter does.

The adapters are random LoRAs made by peft and saved with diffusers' LoRA writer, so they are read
through the same path as a user's file. Before timing, the bench checks that the work is the same:
a mixed row equals that row run alone with its adapter, the separate batches equal the mixed one,
and the fused copy equals the mixed rows of its adapter. JSON + markdown + a PNG of images/s.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcmserve.engine.adapters import Adapter, AdapterSet
from lcmserve.engine.bench import environment, summarize, write_report
from lcmserve.engine.request import Row
from lcmserve.engine.sampler import LCMSampler
from lcmserve.errors import InvalidInputError, check_int

# Attention projections and the feed-forward layers of every transformer block: the layers style LoRAs target.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
SAME_TOL = 1e-4
WAYS = ("mixed", "fused", "separate")


@dataclass
class AdapterBenchConfig:
    model: str = "shapes-lcm"
    adapters: int = 4
    rows_per_adapter: int = 2
    rank: int = 16
    steps: int = 4
    warmup: int = 1
    iters: int = 10
    """Timed rounds; each round runs every way once, in turn."""
    threads: int | None = None
    out: str = "docs/results"
    name: str = "bench-adapters-cpu"

    def __post_init__(self) -> None:
        check_int("adapters", self.adapters, 2, 4)
        check_int("rows_per_adapter", self.rows_per_adapter, 1, 16)
        check_int("rank", self.rank, 1, 256)
        check_int("steps", self.steps, 1, 50)
        check_int("warmup", self.warmup, 0, 100)
        check_int("iters", self.iters, 1, 1000)
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise InvalidInputError.out_of_range("threads", self.threads, "an integer in [1, 1024] or None")


def make_adapter(unet: torch.nn.Module, out_dir: Path, rank: int, seed: int) -> Path:
    """A random LoRA (peft, non-zero B) on ``TARGETS`` of a copy of ``unet``, saved as diffusers saves one."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights=False)
    twin = copy.deepcopy(unet).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin.add_adapter(config)
    layers = get_peft_model_state_dict(twin)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=config.to_dict())
    return out_dir


def fused_copy(model, adapter: Adapter):
    """The model over a copy of its UNet with ``adapter`` fused into the weights; the other parts are shared."""
    unet = copy.deepcopy(model.unet)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for path, factors in adapter.factors.items():
            weight = modules[path].weight
            up = factors.up.reshape(factors.up.shape[0], -1)
            delta = (up @ factors.down.reshape(factors.down.shape[0], -1)).reshape(weight.shape)
            weight += (adapter.scale * delta).to(weight.dtype)
    return dataclasses.replace(model, unet=unet)


def bench_rows(model, names: list[str], per_adapter: int, fused: bool) -> list[Row]:
    """``per_adapter`` rows for each adapter in turn; with ``fused``, the same prompts and seeds with no adapter."""
    guidance = model.default_guidance_scale
    rows = []
    for a, name in enumerate(names):
        for i in range(per_adapter):
            n = a * per_adapter + i
            rows.append(Row(f"a benchmark prompt number {n}", 1000 + n, guidance,
                            adapters=None if fused else {name: 1.0}))
    return rows


def _ways(mixed: LCMSampler, fused: LCMSampler, rows: list[Row], fused_rows: list[Row], per_adapter: int,
          cfg: AdapterBenchConfig, size: int):
    groups = [rows[i : i + per_adapter] for i in range(0, len(rows), per_adapter)]
    return {
        "mixed": lambda: mixed.run_rows(rows, cfg.steps, size, size).images,
        "fused": lambda: fused.run_rows(fused_rows, cfg.steps, size, size).images,
        "separate": lambda: torch.cat([mixed.run_rows(g, cfg.steps, size, size).images for g in groups]),
    }


def check_same_work(mixed: LCMSampler, ways: dict, rows: list[Row], per_adapter: int, cfg: AdapterBenchConfig,
                    size: int) -> dict[str, float]:
    """Max abs differences that must stay within ``SAME_TOL``; raises AssertionError when one does not."""
    with torch.inference_mode():
        batch = ways["mixed"]()
        alone = max((mixed.run_rows([rows[i]], cfg.steps, size, size).images[0] - batch[i]).abs().max().item()
                    for i in range(0, len(rows), per_adapter))
        separate = (ways["separate"]() - batch).abs().max().item()
        fused = (ways["fused"]()[:per_adapter] - batch[:per_adapter]).abs().max().item()
    diffs = {"mixed_row_vs_alone": alone, "separate_vs_mixed": separate, "fused_vs_mixed_first_adapter": fused}
    for key, value in diffs.items():
        if not value <= SAME_TOL:
            raise AssertionError(f"{key}: max abs diff {value:.2e} > {SAME_TOL}: the ways do not do the same work")
    return diffs


def time_ways(ways: dict, cfg: AdapterBenchConfig) -> dict[str, list[float]]:
    """Seconds per batch of every way, the ways taking turns round by round (order rotated each round)."""
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    with torch.inference_mode():
        for r in range(cfg.warmup + cfg.iters):
            for way in WAYS[r % len(WAYS):] + WAYS[: r % len(WAYS)]:
                start = time.perf_counter()
                ways[way]()
                if r >= cfg.warmup:
                    times[way].append(time.perf_counter() - start)
    return times


def run_adapter_bench(cfg: AdapterBenchConfig) -> dict[str, Any]:
    from lcmserve.models import load_model

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model, device="cpu", dtype="float32")
    adapter_set = AdapterSet(model)
    names = [f"style{a}" for a in range(cfg.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [adapter_set.load(name, str(make_adapter(model.unet, Path(tmp) / name, cfg.rank, seed=100 + a)))
                  for a, name in enumerate(names)]
    mixed = LCMSampler(model, adapters=adapter_set, max_batch_size=len(names) * cfg.rows_per_adapter)
    fused = LCMSampler(fused_copy(model, loaded[0]), max_batch_size=mixed.max_batch_size)
    size = model.native_size
    rows = bench_rows(model, names, cfg.rows_per_adapter, fused=False)
    ways = _ways(mixed, fused, rows, bench_rows(model, names, cfg.rows_per_adapter, fused=True),
                 cfg.rows_per_adapter, cfg, size)
    diffs = check_same_work(mixed, ways, rows, cfg.rows_per_adapter, cfg, size)
    times = time_ways(ways, cfg)
    result_rows = []
    for way in WAYS:
        row = {"way": way, "batches": len(names) if way == "separate" else 1, "rows": len(rows),
               **summarize(times[way], len(rows))}
        row["images_per_s_p50"] = len(rows) / (row["p50_ms"] / 1000)
        result_rows.append(row)
    speed = {r["way"]: r["images_per_s_p50"] for r in result_rows}
    ratios = {"mixed_vs_fused": speed["mixed"] / speed["fused"],
              "mixed_vs_separate": speed["mixed"] / speed["separate"]}
    result = {"config": asdict(cfg), "environment": environment(torch.device("cpu")), "size": size,
              "targets": list(TARGETS), "max_abs_diff": diffs, "rows": result_rows, "ratios": ratios}
    write_report(result, Path(cfg.out), cfg.name, _markdown(result), lambda path: _plot(result, path))
    return result


def _markdown(result: dict[str, Any]) -> str:
    env, cfg, ratios = result["environment"], result["config"], result["ratios"]
    n = cfg["adapters"] * cfg["rows_per_adapter"]
    lines = [f"# lcmserve bench adapters: {cfg['model']}\n",
             f"- device: {env['device']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}",
             f"- date: {env['date']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             (f"- {n} rows over {cfg['adapters']} random LoRAs of rank {cfg['rank']} on "
              f"{', '.join(result['targets'])}; float32, eager torch backend, {cfg['steps']} steps, "
              f"{result['size']}x{result['size']}"),
             (f"- the three ways take turns batch by batch: {cfg['warmup']} warm-up round(s), then {cfg['iters']} "
              "timed rounds; images/s from the p50 batch time"),
             ("- same work: max abs diff of a mixed row against that row alone with its adapter "
              f"{result['max_abs_diff']['mixed_row_vs_alone']:.1e}, separate batches against the mixed one "
              f"{result['max_abs_diff']['separate_vs_mixed']:.1e}, fused copy against the mixed rows of its adapter "
              f"{result['max_abs_diff']['fused_vs_mixed_first_adapter']:.1e}\n"),
             "| way | what runs | UNet batches per step | p50 ms per batch of " + str(n) + " | p90 ms | images/s |",
             "|---|---|---|---|---|---|"]
    what = {"mixed": f"{n} rows, {cfg['rows_per_adapter']} per adapter, one batch (AdapterSet hooks)",
            "fused": f"{n} rows under one adapter fused into a copy of the UNet",
            "separate": f"{cfg['adapters']} batches of {cfg['rows_per_adapter']} rows, one per adapter"}
    for r in result["rows"]:
        lines.append(f"| {r['way']} | {what[r['way']]} | {r['batches']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['images_per_s_p50']:.2f} |")
    lines += ["", f"- mixed / fused (images/s): {ratios['mixed_vs_fused']:.2f}",
              f"- mixed / separate (images/s): {ratios['mixed_vs_separate']:.2f}", ""]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, env, cfg = result["rows"], result["environment"], result["config"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    speeds = [r["images_per_s_p50"] for r in rows]
    bars = ax.bar([r["way"] for r in rows], speeds, color=["C0", "C1", "C2"])
    for bar, speed in zip(bars, speeds):
        ax.annotate(f"{speed:.2f}", (bar.get_x() + bar.get_width() / 2, speed), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("images/s (p50 batch)")
    ax.set_ylim(0, float(np.max(speeds)) * 1.15)
    ax.set_title(f"{cfg['adapters'] * cfg['rows_per_adapter']} rows over {cfg['adapters']} LoRAs, {cfg['model']}, "
                 f"{cfg['steps']} steps\n{env['device']} ({env['date'][:10]})", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["AdapterBenchConfig", "check_same_work", "fused_copy", "make_adapter", "run_adapter_bench"]
