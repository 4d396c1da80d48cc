"""``lcmserve bench``: latency and throughput of the backends, side by side with diffusers.

For every backend and every (resolution, steps, batch size) the benchmark runs ``warmup``
untimed and ``iters`` timed batches through LCMSampler (tokenization, per-row noise, the
backend), and records p50/p90/p99 latency, throughput, the backend's per-stage split
(text, UNet loop, VAE) and peak memory (CUDA ``max_memory_reserved`` on a GPU; the
process's peak RSS on a CPU, a high-water mark over the whole run). In the same run the
same modules go through diffusers' ``LatentConsistencyModelPipeline`` (eager, same dtype unless
``baseline_dtype`` says otherwise) as the baseline; ``interleave`` times the backends' batches
in turn. The row ``default`` runs what ``--backend auto`` picks for a server (backends/auto.py): the
backend, dtype and attention, on its own copy of the same weights. Results:
``NAME.json``, ``NAME.md`` and ``NAME.png``; ``compare`` merges result files from several machines into
one table and plot.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcmserve.engine.backends import (
    AUTO,
    BACKENDS,
    TORCH_EXECUTED,
    BackendChoice,
    BucketSet,
    check_compile_mode,
    choose_backend,
    create_backend,
)
from lcmserve.engine.backends.base import sync
from lcmserve.engine.cache import library_versions
from lcmserve.engine.kernels.attention import check_attention, use_small_head_attention, with_standard_attention
from lcmserve.engine.request import MAX_STEPS, MIN_STEPS, Row
from lcmserve.errors import InvalidInputError, check_int
from lcmserve.models.loading import DTYPES, cpu_has_bfloat16

logger = logging.getLogger(__name__)

BASELINE = "diffusers"
DEFAULT_ROW = "default"  # what `--backend auto` picks for a server: backend, dtype and attention
MAX_BENCH_BATCH = 32
_LIBRARIES = ("lcmserve", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


@dataclass(frozen=True)
class BenchConfig:
    """One bounded benchmark run."""

    model: str = "shapes-lcm"
    """Model to load (folder, Hub id or preset:NAME)."""
    vae: str | None = None
    """A VAE that replaces the model's (e.g. preset:taesd); diffusers' baseline decodes with it too."""
    lora: str | None = None
    """An LCM-LoRA fused into the model at load (a base model's folder or Hub id in ``model``); diffusers'
    baseline runs the same fused weights through StableDiffusion(XL)Pipeline with LCMScheduler."""
    lora_scale: float = 1.0
    unet: str | None = None
    """An LCM UNet folder that replaces the pipeline's UNet (as lcm-sdxl is distributed)."""
    backends: tuple[str, ...] = ("torch",)
    """Backends to measure, from default (backend auto with its dtype and attention, on its own copy of the
    weights), torch, compiled, cuda-graph, onnx, tensorrt."""
    batch_sizes: tuple[int, ...] = (1, 8)
    """Rows per batch, 1 to 32."""
    steps: tuple[int, ...] = (4,)
    """LCM step counts, 1 to 8."""
    resolutions: tuple[tuple[int, int], ...] = ()
    """(height, width) pairs; empty: the model's native size."""
    warmup: int = 1
    """Untimed batches before the timed ones, per configuration."""
    iters: int = 5
    """Timed batches per configuration."""
    baseline: bool = True
    """Also run diffusers' pipeline (eager; same dtype and modules unless baseline_dtype) as the baseline."""
    device: str = "auto"
    dtype: str = "auto"
    baseline_dtype: str | None = None
    """Run diffusers' pipeline in another dtype (its own copy of the same weights), e.g. float32, what
    diffusers runs on a CPU by default, against our bfloat16; None: the same dtype as ours."""
    guidance: float | None = None
    """Every row's w, ours and diffusers' alike; None: the model's default (8.0 for a distilled LCM, 1.0
    for an LCM-LoRA), recorded in the results."""
    cache_dir: str | None = None
    """ONNX graphs and TensorRT engines (default: $LCMSERVE_CACHE_DIR or ~/.cache/lcmserve)."""
    compile: bool = False
    """torch.compile inside the cuda-graph backend."""
    compile_mode: str = "max-autotune-no-cudagraphs"
    """torch.compile mode on a GPU: max-autotune-no-cudagraphs or default (a far shorter warm-up)."""
    channels_last: bool = False
    """NHWC convolutions in the cuda-graph backend (it converts the shared model: run it after the
    baseline and the other backends, or in a bench of its own)."""
    exporter: str = "dynamo"
    """torch.onnx exporter of the onnx backend (dynamo or legacy)."""
    attention: str = AUTO
    """small-head: our CPU attention kernel in the torch-executed backends (torch, compiled, cuda-graph);
    diffusers' baseline and the onnx/tensorrt graphs keep SDPA. auto: the default row takes the rule's
    pick, the named backends SDPA; sdpa or small-head given: the default row runs it too."""
    threads: int | None = None
    """CPU threads of torch and ONNX Runtime (None: their defaults). On a shared CPU, 1 avoids
    the OpenMP barrier stalls that many threads suffer when other processes hold the cores."""
    interleave: bool = False
    """Set up every backend at once and time their batches in turn (round-robin per configuration),
    so a slow spell of a shared machine falls on all of them alike instead of on one; peak memory is
    then the whole set's. Not with channels_last, which converts the shared model."""
    profile: bool = False
    """After each row's timed batches, run one more under torch.profiler and keep its top operators
    by self time (onnx and tensorrt rows run outside torch and are not profiled)."""
    profile_top: int = 12
    """How many operators each profiled row lists, 1-500."""
    out: str = "docs/results"
    name: str = "bench"
    progress: bool = True

    def __post_init__(self) -> None:
        for backend in self.backends:
            if backend not in (DEFAULT_ROW, *BACKENDS):
                raise InvalidInputError.out_of_range("backends", backend,
                                                     "each one of " + ", ".join((DEFAULT_ROW, *BACKENDS)))
        if not self.backends and not self.baseline:
            raise InvalidInputError("backends: give at least one backend or keep the diffusers baseline",
                                    param="backends")
        if not self.batch_sizes or any(not 1 <= b <= MAX_BENCH_BATCH for b in self.batch_sizes):
            raise InvalidInputError.out_of_range(
                "batch_sizes", list(self.batch_sizes), f"integers in [1, {MAX_BENCH_BATCH}]"
            )
        if not self.steps or any(not MIN_STEPS <= s <= MAX_STEPS for s in self.steps):
            raise InvalidInputError.out_of_range("steps", list(self.steps), f"integers in [{MIN_STEPS}, {MAX_STEPS}]")
        check_int("warmup", self.warmup, 0)
        check_int("iters", self.iters, 1, 1000)
        if self.resolutions:
            BucketSet(resolutions=self.resolutions)  # same checks as the compiled backends
        if self.dtype != AUTO and self.dtype not in DTYPES:
            raise InvalidInputError.out_of_range("dtype", self.dtype, "auto, " + ", ".join(DTYPES))
        if self.baseline_dtype is not None and self.baseline_dtype not in DTYPES:
            raise InvalidInputError.out_of_range("baseline_dtype", self.baseline_dtype,
                                                 ", ".join(DTYPES) + " or None (the bench's dtype)")
        if self.interleave and self.channels_last:
            raise InvalidInputError("interleave: not with channels_last, which converts the model every backend "
                                    "shares; bench channels-last in a run of its own", param="interleave")
        check_attention(self.attention)
        check_compile_mode(self.compile_mode)
        check_int("profile_top", self.profile_top, 1, 500)
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise InvalidInputError.out_of_range("threads", self.threads, "an integer in [1, 1024] or None")


# -- measuring ----------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": name, "device_type": device.type, "machine": platform.node(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {k: v for k, v in library_versions(_LIBRARIES).items() if v != "absent"},
        **({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bfloat16": cpu_has_bfloat16()}
           if device.type == "cpu" else {}),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        # Reserved, not allocated: the blocks CUDA graphs keep in their private pools count as free
        # to max_memory_allocated although no one else can use them.
        return torch.cuda.max_memory_reserved(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summarize(latencies_s: list[float], batch_size: int) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "throughput_img_s": float(batch_size / (ms.mean() / 1000))}


def _rows(batch_size: int, guidance: float) -> list[Row]:
    return [Row(f"a benchmark prompt number {i}", 1000 + i, guidance) for i in range(batch_size)]


def diffusers_pipeline(model):
    """diffusers' own pipeline over the very same weights (no copy), with LCMScheduler and diffusers' own
    attention (a UNet that runs our small-head kernel is given to it as a weight-sharing SDPA twin)."""
    from diffusers import (
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    scheduler = LCMScheduler.from_config(model.scheduler_config)
    unet = with_standard_attention(model.unet)
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=unet, scheduler=scheduler,
        )
    else:
        cls = LatentConsistencyModelPipeline if model.guidance_mode == "embedding" else StableDiffusionPipeline
        pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_once(runner: str, target, cfg: BenchConfig, batch_size: int, steps: int, height: int, width: int):
    """One batch of ``runner`` (diffusers' pipeline or one of our samplers); returns its stage times."""
    rows = _rows(batch_size, cfg.guidance)
    if runner == BASELINE:
        def run_once():
            target([r.prompt for r in rows], num_inference_steps=steps, guidance_scale=cfg.guidance, height=height,
                   width=width, output_type="pt", generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows])
    else:
        def run_once():
            return target.run_rows(rows, steps, width, height).times
    return run_once


def _time_shape(live: dict[str, tuple[Any, float]], cfg: BenchConfig, device: torch.device, bar,
                errors: list[dict[str, Any]], batch_size: int, steps: int, height: int, width: int,
                ) -> dict[str, tuple[list[float], list, dict[str, Any] | None]]:
    """Warm-up and timed batches of every live runner at one shape, taking turns batch by batch.

    A runner that fails is recorded in ``errors`` and left out of the shape's remaining batches."""
    runs, times = {}, {}
    done = dict.fromkeys(live, 0)  # batches run, for the progress bar

    def ran(runner: str) -> None:
        done[runner] += 1
        bar.update(1)

    def failed(runner: str, exc: Exception, stage: str = "run") -> None:
        logger.exception("bench: %s failed at batch %d, %d steps, %dx%d", runner, batch_size, steps, height, width)
        errors.append({"backend": runner, "stage": stage, "batch_size": batch_size, "steps": steps,
                       "height": height, "width": width, "error": f"{type(exc).__name__}: {exc}"})
        runs.pop(runner, None)
        bar.update(max(0, cfg.warmup + cfg.iters - done[runner]))

    for runner, (target, _) in live.items():
        try:
            if runner != BASELINE and target.backend.name == "onnx":
                target.backend.prepare(height, width)  # export / load outside the timed runs
        except Exception as exc:  # noqa: BLE001 - recorded by failed()
            failed(runner, exc)
            continue
        runs[runner] = _run_once(runner, target, cfg, batch_size, steps, height, width)
        times[runner] = ([], [])
    with torch.inference_mode():
        for _ in range(cfg.warmup):
            for runner, run_once in list(runs.items()):
                try:
                    run_once()
                    ran(runner)
                except Exception as exc:  # noqa: BLE001 - recorded by failed()
                    failed(runner, exc)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(cfg.iters):
            for runner, run_once in list(runs.items()):
                try:
                    sync(device)
                    start = time.perf_counter()
                    stage_times = run_once()
                    sync(device)
                    times[runner][0].append(time.perf_counter() - start)
                    times[runner][1].append(stage_times)
                    ran(runner)
                except Exception as exc:  # noqa: BLE001 - recorded by failed()
                    failed(runner, exc)
        measured = {}
        for runner, run_once in list(runs.items()):
            profiled = None
            if cfg.profile and runner not in UNPROFILED:
                try:
                    profiled = profile_once(run_once, device, cfg.profile_top)
                except Exception as exc:  # noqa: BLE001 - the timings stand; only the profile is missing
                    failed(runner, exc, stage="profile")
            measured[runner] = (*times[runner], profiled)
    return measured


PROFILE_TOP = 12
UNPROFILED = ("onnx", "tensorrt")  # their kernels run outside torch, invisible to its profiler


def profile_once(run_once, device: torch.device, top: int = PROFILE_TOP) -> dict[str, Any]:
    """One more batch under torch.profiler: the operators with the most self time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_once()
        sync(device)
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total_us = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return {
        "clock": "device" if on_device else "cpu",
        "total_ms": round(total_us / 1000, 3),
        "ops": [{"op": e.key, "self_ms": round(getattr(e, key) / 1000, 3),
                 "share": round(getattr(e, key) / total_us, 4) if total_us else 0.0, "calls": e.count}
                for e in events[:top]],
    }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the sweep, write NAME.json / .md / .png under cfg.out, return the result."""
    from tqdm import tqdm

    from lcmserve.models import load_model

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model, lora=cfg.lora, lora_scale=cfg.lora_scale, unet=cfg.unet, vae=cfg.vae,
                       device=cfg.device, dtype=cfg.dtype)
    if cfg.guidance is None:
        cfg = dataclasses.replace(cfg, guidance=model.default_guidance_scale)
    device = model.device
    resolutions = cfg.resolutions or ((model.native_size, model.native_size),)
    shapes = [(r, s, b) for r in resolutions for s in cfg.steps for b in cfg.batch_sizes]
    per_config = cfg.warmup + cfg.iters
    runners = ([BASELINE] if cfg.baseline else []) + list(cfg.backends)  # the baseline first: a cut run keeps it
    # Sequential: one backend at a time. Interleaved: all of them set up together and their batches
    # timed in turn, so a slow spell of a shared machine falls on every backend alike.
    groups = [runners] if cfg.interleave else [[runner] for runner in runners]
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    models, choice = _models(cfg, model, runners)
    memory_kind = ("cuda_max_reserved" if device.type == "cuda" else "process_peak_rss") + \
        ("_all_backends" if cfg.interleave else "")
    with tqdm(total=len(runners) * len(shapes) * per_config, desc="bench", unit="batch",
              disable=not cfg.progress) as bar:
        for group in groups:
            live = _set_up(group, cfg, models, choice, tuple(resolutions), bar, errors, len(shapes) * per_config)
            bar.set_postfix_str(",".join(group))
            for (height, width), steps, batch_size in shapes:
                measured = _time_shape(live, cfg, device, bar, errors, batch_size, steps, height, width)
                peak_mb = _peak_memory_mb(device)
                for runner, (latencies, stages, profiled) in measured.items():
                    row = {"backend": runner, "batch_size": batch_size, "steps": steps, "height": height,
                           "width": width, "dtype": models[runner].dtype_name,
                           "attention": _attention(cfg, runner, choice), "vae": cfg.vae, "iters": cfg.iters,
                           "setup_s": round(live[runner][1], 3), **summarize(latencies, batch_size),
                           "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": memory_kind,
                           **({"auto": choice.describe()} if runner == DEFAULT_ROW else {})}
                    rows.append(_with_stages(row, stages, profiled))
            rows.sort(key=lambda r: runners.index(r["backend"]))  # by backend, as a sequential run lists them
            # Written after every group, so an interrupted run keeps what it measured.
            write_results(_result(cfg, resolutions, model, device, rows, errors), Path(cfg.out), cfg.name)
    result = _result(cfg, resolutions, model, device, rows, errors)
    write_results(result, Path(cfg.out), cfg.name)
    return result


def _models(cfg: BenchConfig, model, runners: list[str]) -> tuple[dict[str, Any], BackendChoice | None]:
    """Each runner's model: ``model`` for the named backends; diffusers' in ``baseline_dtype`` when set; the
    default row's own copy in the dtype auto picks (its attention may differ from the named rows')."""
    from lcmserve.models import load_model

    def load(dtype: str):
        return load_model(cfg.model, lora=cfg.lora, lora_scale=cfg.lora_scale, unet=cfg.unet, vae=cfg.vae,
                          device=str(model.device), dtype=dtype)

    if cfg.attention == "small-head" and any(b in TORCH_EXECUTED for b in cfg.backends):
        use_small_head_attention(model, cfg.cache_dir)  # before the baseline is set up: it takes an SDPA twin
    models = dict.fromkeys(runners, model)
    if BASELINE in runners and cfg.baseline_dtype not in (None, model.dtype_name):
        models[BASELINE] = load(cfg.baseline_dtype)
    choice = None
    if DEFAULT_ROW in runners:
        choice = choose_backend(model, model.device, dtype=cfg.dtype, attention=cfg.attention)
        models[DEFAULT_ROW] = load(choice.dtype)
    return models, choice


def _attention(cfg: BenchConfig, runner: str, choice: BackendChoice | None = None) -> str:
    """The attention a runner's row ran: auto's pick in the default row; the bench's in the torch-executed
    backends (SDPA when left at auto); SDPA elsewhere."""
    if runner == DEFAULT_ROW:
        return choice.attention
    return cfg.attention if runner in TORCH_EXECUTED and cfg.attention != AUTO else "sdpa"


def _set_up(group: list[str], cfg: BenchConfig, models: dict[str, Any], choice: BackendChoice | None, resolutions,
            bar, errors: list[dict[str, Any]], batches: int) -> dict[str, tuple[Any, float]]:
    """Each runner of the group as (diffusers' pipeline or our sampler, setup seconds); one that fails is recorded
    in ``errors`` (and its ``batches`` counted done) and left out, so it does not cost the others their rows."""
    from lcmserve.engine.sampler import LCMSampler

    buckets = BucketSet(tuple(cfg.batch_sizes), tuple(cfg.steps), resolutions)
    live: dict[str, tuple[Any, float]] = {}
    for runner in group:
        bar.set_postfix_str(f"{runner}: setup")
        started = time.perf_counter()
        try:
            if runner == BASELINE:
                target = diffusers_pipeline(models[runner])
            else:
                name = choice.backend if runner == DEFAULT_ROW else runner
                backend = create_backend(name, models[runner], buckets=buckets, cache_dir=cfg.cache_dir,
                                         compile=cfg.compile, compile_mode=cfg.compile_mode,
                                         channels_last=cfg.channels_last, exporter=cfg.exporter, threads=cfg.threads,
                                         attention=_attention(cfg, runner, choice))
                target = LCMSampler(models[runner], backend=backend, max_batch_size=max(cfg.batch_sizes))
        except Exception as exc:  # one broken backend must not cost the rows of the others
            logger.exception("bench: %s could not be set up", runner)
            errors.append({"backend": runner, "stage": "setup", "error": f"{type(exc).__name__}: {exc}"})
            bar.update(batches)
            continue
        live[runner] = (target, time.perf_counter() - started)
    return live


def _with_stages(row: dict[str, Any], stages: list, profiled: dict[str, Any] | None) -> dict[str, Any]:
    """The row with the backend's mean per-stage split (when it reports one) and its profile (when taken)."""
    if stages and stages[0] is not None:
        for stage in ("text_s", "unet_s", "vae_s"):
            row[f"{stage[:-2]}_ms"] = float(np.mean([getattr(t, stage) for t in stages]) * 1000)
    if profiled is not None:
        row["profile"] = profiled
    return row


def _result(cfg: BenchConfig, resolutions, model, device: torch.device, rows: list[dict[str, Any]],
            errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    _add_speedups(rows)
    return {"config": {**dataclasses.asdict(cfg), "resolutions": [list(r) for r in resolutions]},
            "model": model.describe(), "environment": environment(device), "rows": rows, "errors": errors or []}


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    base = {(r["batch_size"], r["steps"], r["height"], r["width"]): r for r in rows if r["backend"] == BASELINE}
    for r in rows:
        ref = base.get((r["batch_size"], r["steps"], r["height"], r["width"]))
        if ref is not None:
            r["speedup_vs_diffusers"] = round(ref["mean_ms"] / r["mean_ms"], 3)


# -- reporting -----------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], with_device: bool = False) -> str:
    head = ["backend", "batch", "steps", "size", "dtype", "p50 ms", "p90 ms", "p99 ms", "img/s", "text ms", "unet ms",
            "vae ms", "x diffusers", "peak MB"]
    if with_device:
        head.insert(0, "device")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = _row_label(r)
        cells = [label, str(r["batch_size"]), str(r["steps"]), f"{r['height']}x{r['width']}",
                 r.get("dtype", "?"), _fmt(r["p50_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]), _fmt(r["throughput_img_s"], 2),
                 _fmt(r.get("text_ms")), _fmt(r.get("unet_ms")), _fmt(r.get("vae_ms")),
                 _fmt(r.get("speedup_vs_diffusers"), 2), _fmt(r.get("peak_memory_mb"), 0)]
        if with_device:
            cells.insert(0, r.get("device", "?"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _model_label(cfg: dict[str, Any]) -> str:
    parts = [cfg["model"]]
    if cfg.get("lora"):
        parts.append(f"+ LoRA {cfg['lora']}" + (f" (scale {cfg['lora_scale']:g})" if cfg.get("lora_scale", 1) != 1 else ""))
    if cfg.get("unet"):
        parts.append(f"with UNet {cfg['unet']}")
    if cfg.get("vae"):
        parts.append(f"with VAE {cfg['vae']}")
    return " ".join(parts)


def _markdown(result: dict[str, Any]) -> str:
    env, cfg = result["environment"], result["config"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (
        f"# lcmserve bench: {_model_label(cfg)}\n\n"
        f"- device: {env['device']} ({env['device_type']}), machine {env['machine']}, {env['platform']}, "
        f"{env['cpu_count']} CPUs, torch threads {env['torch_threads']}"
        + (f", vectors {env['cpu_capability']}, bfloat16 instructions {'yes' if env['cpu_bfloat16'] else 'no'}"
           if "cpu_bfloat16" in env else "") + "\n"
        f"- date: {env['date']}\n- versions: {versions}\n"
        f"- {cfg['warmup']} warm-up + {cfg['iters']} timed batches per row; guidance {cfg['guidance']}; latency is "
        "end to end per batch (tokenize, noise, text encoder, LCM loop, VAE decode); stage times are the backend's "
        "own split; peak memory is CUDA max_memory_reserved on a GPU and the process's peak RSS on a CPU"
        + ("; backends interleaved batch by batch (peak memory is the whole set's)" if cfg.get("interleave") else "")
        + "\n\n"
        + markdown_table(result["rows"])
        + next((f"\n`default` is what `--backend auto` picks for a server: {r['auto']['reason']}.\n"
                for r in result["rows"] if r.get("auto")), "")
        + _profile_markdown(result["rows"])
        + "".join(f"\n- {e['backend']} failed ({e['stage']}"
                  + (f", batch {e['batch_size']}, {e['steps']} steps, {e['height']}x{e['width']}" if "steps" in e else "")
                  + f"): {e['error']}\n" for e in result.get("errors", []))
    )


COMPILED_GRAPH_EVENT = "## Call CompiledFxGraph"


def _profile_markdown(rows: list[dict[str, Any]]) -> str:
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return ""
    intro = ("\n## Where the time goes\n\nOne more batch per row under torch.profiler; the operators with the most "
             "self time (device time on a GPU, CPU time on a CPU), as a share of all operators' self time.\n")
    parts = [intro]
    for r in profiled:
        prof = r["profile"]
        parts.append(f"\n### {r['backend']}, batch {r['batch_size']}, {r['steps']} steps, {r['height']}x{r['width']} "
                     f"({prof['total_ms']:.1f} ms of {prof['clock']} time)\n\n| operator | self ms | share | calls |\n"
                     "|---|---|---|---|\n")
        parts.extend(f"| `{op['op']}` | {op['self_ms']:.2f} | {op['share']:.1%} | {op['calls']} |\n"
                     for op in prof["ops"])
        if any(op["op"].startswith(COMPILED_GRAPH_EVENT) for op in prof["ops"]) and \
                not any(op["op"].startswith("aoti_torch_") for op in prof["ops"]):
            parts.append(f"\n`{COMPILED_GRAPH_EVENT}` holds the calls that inductor's C++ wrapper makes (oneDNN's "
                         "and its own kernels); `TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1` names each of them.\n")
    return "".join(parts)


def _row_label(r: dict[str, Any]) -> str:
    """The backend, with what sets the row apart: auto's pick, our attention kernel, a replacement VAE."""
    return (r["backend"] + (f" = {r['auto']['backend']}" if r.get("auto") else "")
            + (f" ({r['attention']})" if r.get("attention", "sdpa") != "sdpa" else "")
            + (f" + VAE {r['vae']}" if r.get("vae") else ""))


def _label(r: dict[str, Any]) -> str:
    return f"{_row_label(r)} {r.get('dtype', '?')} {r['steps']} steps {r['height']}x{r['width']}"


_STAGE_KEYS = (("text_ms", "text encoder"), ("unet_ms", "UNet loop"), ("vae_ms", "VAE decode"))


def plot(rows: list[dict[str, Any]], path: Path, title: str, label=_label) -> None:
    """Latency and throughput against batch size, the legend below them; with stage times, a third
    panel under those: where each row's time goes, per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(label(r), []).append(r)
    staged = [r for r in rows if all(r.get(key) is not None for key, _ in _STAGE_KEYS)]
    curves_h = 4 + 0.18 * len(series)  # room for the legend's lines
    stages_h = 1 + 0.25 * len(staged) if staged else 0
    fig = plt.figure(figsize=(11, curves_h + stages_h), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(curves_h, stages_h)) if staged else (fig, None)
    axes = top.subplots(1, 2)
    for name, items in series.items():
        items = sorted(items, key=lambda r: r["batch_size"])
        xs = [r["batch_size"] for r in items]
        axes[0].plot(xs, [r["p50_ms"] for r in items], marker="o", label=name)
        axes[1].plot(xs, [r["throughput_img_s"] for r in items], marker="o", label=name)
    for ax, ylabel in zip(axes, ("p50 latency per batch (ms)", "throughput (images/s)")):
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    top.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7, ncols=2)
    if bottom is not None:  # one bar per row, split by stage, in ms per image so that batch sizes compare
        ax = bottom.subplots()
        left = [0.0] * len(staged)
        for key, stage in _STAGE_KEYS:
            widths = [r[key] / r["batch_size"] for r in staged]
            ax.barh(range(len(staged)), widths, left=left, label=stage)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_yticks(range(len(staged)), [f"{label(r)}, batch {r['batch_size']}" for r in staged], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per image, by stage (the backend's own split)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict[str, Any], out: Path, name: str, markdown: str,
                 draw: Callable[[Path], None]) -> dict[str, Path]:
    """NAME.json (the result), NAME.md (``markdown``) and NAME.png (``draw(path)``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown)
    draw(paths["png"])
    return paths


def write_results(result: dict[str, Any], out: Path, name: str) -> dict[str, Path]:
    env = result["environment"]
    title = f"{result['config']['model']} on {env['device']} ({env['date'][:10]})"
    return write_report(result, out, name, _markdown(result), lambda path: plot(result["rows"], path, title))


def compare(files: list[str | Path], out: str | Path, name: str = "bench-compare") -> dict[str, Any]:
    """Merge bench result files (any machines, any GPUs) into one table and one plot."""
    if len(files) < 1:
        raise InvalidInputError("files: give at least one bench JSON file", param="files")
    merged, sources = [], []
    for file in files:
        path = Path(file)
        try:
            result = json.loads(path.read_text())
            rows, env = result["rows"], result["environment"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"files: {path} is not a bench result ({exc})", param="files") from exc
        sources.append({"file": str(path), "device": env["device"], "machine": env["machine"], "date": env["date"],
                        "model": _model_label(result["config"])})
        merged.extend({**r, "device": env["device"], "machine": env["machine"]} for r in rows)
    merged.sort(key=lambda r: (r["steps"], r["height"], r["width"], r["batch_size"], r["device"], r["backend"]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"sources": sources, "rows": merged}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    listing = "\n".join(f"- {s['file']}: {s['model']} on {s['device']} ({s['machine']}, {s['date']})" for s in sources)
    (out / f"{name}.md").write_text(f"# lcmserve bench comparison\n\n{listing}\n\n" + markdown_table(merged, True))
    plot(merged, out / f"{name}.png", "lcmserve bench comparison",
         label=lambda r: f"{r['device']}: {_label(r)}")
    return result


__all__ = ["BASELINE", "BenchConfig", "compare", "run_bench"]
