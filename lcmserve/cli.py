"""Command line: ``lcmserve generate | info`` (serve, distill, eval, bench and export join later)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from lcmserve import __version__
from lcmserve.errors import InvalidInputError, LCMServeError

logger = logging.getLogger("lcmserve.cli")


def _quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (load bars, deprecations) out of our output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    if default_model is None:
        p.add_argument("model", help="diffusers folder, Hub id, or preset:NAME (sd15, sd21, sdxl, tiny-sd, ...)")
    else:
        p.add_argument("--model", default=default_model,
                       help=f"diffusers folder, Hub id, or preset:NAME (default: {default_model})")
    p.add_argument("--lora", default=None, help="LCM-LoRA adapter (folder, file, Hub id, or the bundled "
                   "shapes-lcm-lora for shapes-teacher) fused into the model at load")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of the fused LoRA (default 1.0)")
    p.add_argument("--unet", default=None, help="an LCM UNet folder that replaces the pipeline's UNet")
    p.add_argument("--vae", default=None, help="a VAE that replaces the pipeline's: a folder or Hub id of an "
                   "AutoencoderKL or AutoencoderTiny (TAESD: a much faster decode), or preset:taesd (random weights)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (auto: fp16 on GPU, fp32 on CPU)")


def _load(args):
    from lcmserve.models import load_model

    return load_model(args.model, lora=args.lora, lora_scale=args.lora_scale, unet=args.unet, vae=args.vae,
                      device=args.device, dtype=args.dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lcmserve.engine import GenerationRequest, LCMSampler, Limits
    from lcmserve.engine.backends.cuda_graph import check_compile_mode
    from lcmserve.engine.request import check_guidance, check_num_images, check_seed, check_steps

    started = time.perf_counter()
    # Values that do not depend on the model are checked before the (slow) load.
    limits = Limits()
    check_steps(args.steps)
    if args.guidance is not None:
        check_guidance(args.guidance, limits)
    check_num_images(args.num_images, limits)
    check_seed(args.seed)
    check_compile_mode(args.compile_mode)
    model = _load(args)
    if args.model.startswith("preset:"):
        logger.warning("model %s has random weights: its images are noise (use it to measure speed)", args.model)
    sampler = LCMSampler(model, max_batch_size=args.batch_size)
    request = GenerationRequest(
        prompt=args.prompt, num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance,
        width=args.width, height=args.height, seed=args.seed, negative_prompt=args.negative_prompt,
    )
    resolved = sampler.resolve(request)  # every bad value is reported before any work
    if args.backend != "torch" or args.attention != "sdpa":
        sampler.backend = _generate_backend(args, model, resolved)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = -(-args.num_images // args.batch_size)
    with tqdm(total=batches * args.steps, desc="sampling", unit="step", disable=args.quiet) as bar:
        def on_step(done: int, total: int) -> None:
            bar.update(done - bar.n)

        result = sampler.generate(request, on_step=on_step)
    files = []
    for image, seed in zip(result.to_pil(), result.seeds):
        path = out_dir / f"{len(files):03d}-seed{seed}.{args.format}"
        image.save(path)
        files.append(path.name)
    record = {
        "lcmserve_version": __version__,
        "request": {k: v for k, v in vars(result.request).items()},
        "seeds": result.seeds,
        "files": files,
        "model": model.describe(),
        "times_s": {"text": result.times.text_s, "unet": result.times.unet_s, "vae": result.times.vae_s,
                    "total_with_load": time.perf_counter() - started},
    }
    (out_dir / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(files)} image(s) to {out_dir}/ ({', '.join(files)})")
    return 0


def _generate_backend(args: argparse.Namespace, model, resolved):
    from lcmserve.engine.backends import BucketSet, create_backend

    # Compiled backends build just what this run needs: its steps, its size and its batch sizes (the sampler
    # runs the images in batches of --batch-size and one of what is left), each bucket a compile at start-up.
    full, rest = min(args.batch_size, args.num_images), args.num_images % args.batch_size
    sizes = tuple(sorted({full, rest} - {0}))
    buckets = BucketSet(sizes, (resolved.steps,), ((resolved.height, resolved.width),))
    return create_backend(args.backend, model, buckets=buckets, cache_dir=args.cache_dir, compile=args.compile,
                          compile_mode=args.compile_mode, channels_last=args.channels_last, exporter=args.exporter,
                          progress=not args.quiet, attention=args.attention)


def _add_attention(parser) -> None:
    parser.add_argument("--attention", choices=["sdpa", "small-head"], default="sdpa",
                        help="sdpa: torch's scaled_dot_product_attention (default); small-head: our CPU kernel for "
                             "heads of up to 16 channels, or 24 over at most 80 keys (the shapes models), built "
                             "with the C compiler on first use")


def cmd_export(args: argparse.Namespace) -> int:
    from lcmserve.engine.cache import default_cache_dir
    from lcmserve.engine.export import export_model, write_export_index

    model = _load(args)
    height = args.height or model.native_size
    width = args.width or model.native_size
    out = Path(args.out) if args.out else default_cache_dir()
    paths = export_model(model, out / "onnx", height, width, exporter=args.exporter, progress=True)
    index = write_export_index(model, out, paths, height, width)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"wrote {index}; use it with --backend onnx --cache-dir {out}")
    return 0


def _add_export(sub) -> None:
    from lcmserve.engine.export import EXPORTERS

    ex = sub.add_parser("export", help="export text encoder(s), UNet and VAE decoder to ONNX (dynamic batch), cached")
    _add_model_args(ex, None)
    ex.add_argument("--out", default=None, help="cache folder (default: $LCMSERVE_CACHE_DIR or ~/.cache/lcmserve)")
    ex.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    ex.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    ex.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                    help="torch.onnx exporter: dynamo (default) or legacy (TorchScript tracer, faster, deprecated)")
    ex.set_defaults(func=cmd_export)


def cmd_bench(args: argparse.Namespace) -> int:
    from lcmserve.engine.backends.buckets import parse_resolutions
    from lcmserve.engine.bench import BenchConfig, compare, run_bench

    if args.bench_command == "compare":
        compare(args.files, args.out, args.name)
        print((Path(args.out) / f"{args.name}.md").read_text())
        return 0
    if args.bench_command == "attention":
        from lcmserve.engine.bench_attention import AttentionBenchConfig, run_attention_bench

        run_attention_bench(AttentionBenchConfig(
            model=args.model, batch_sizes=tuple(args.batch_sizes), dtypes=tuple(args.dtypes.split(",")),
            iters=args.iters, threads=args.threads, cache_dir=args.cache_dir, out=args.out, name=args.name))
        print((Path(args.out) / f"{args.name}.md").read_text())
        return 0
    cfg = BenchConfig(
        model=args.model, vae=args.vae, lora=args.lora, lora_scale=args.lora_scale, unet=args.unet, backends=tuple(b for b in args.backends.split(",") if b), batch_sizes=tuple(args.batch_sizes),
        steps=tuple(args.steps), resolutions=parse_resolutions(args.resolutions), warmup=args.warmup, iters=args.iters,
        baseline=not args.no_baseline, device=args.device, dtype=args.dtype, guidance=args.guidance,
        cache_dir=args.cache_dir, compile=args.compile, compile_mode=args.compile_mode,
        channels_last=args.channels_last, exporter=args.exporter,
        threads=args.threads, baseline_dtype=args.baseline_dtype, interleave=args.interleave, profile=args.profile,
        profile_top=args.profile_top,
        attention=args.attention, out=args.out, name=args.name, progress=not args.quiet,
    )
    result = run_bench(cfg)
    print((Path(cfg.out) / f"{cfg.name}.md").read_text())
    if not result["rows"]:
        print("error: no backend produced a measurement (see the failures above)", file=sys.stderr)
        return 1
    return 0


def _add_bench(sub) -> None:
    bn = sub.add_parser("bench", help="latency/throughput of the backends vs diffusers (JSON, markdown, plot); "
                        "`bench compare A.json B.json` merges runs")
    bn.add_argument("--model", default="shapes-lcm", help="model to load (default shapes-lcm, the bundled model)")
    bn.add_argument("--vae", default=None, help="a VAE that replaces the model's, for ours and diffusers' alike "
                    "(folder, Hub id, or preset:taesd for TAESD's architecture with random weights)")
    bn.add_argument("--lora", default=None, help="an LCM-LoRA fused into --model (a base model) at load, for ours "
                    "and diffusers' alike")
    bn.add_argument("--lora-scale", type=float, default=1.0, help="weight of the fused LoRA (default 1.0)")
    bn.add_argument("--unet", default=None, help="an LCM UNet folder that replaces the pipeline's UNet")
    bn.add_argument("--backends", default="torch", help="comma list of torch, compiled, cuda-graph, onnx, tensorrt")
    bn.add_argument("--batch-sizes", type=_int_list, default=[1, 8], help="comma list in [1, 32] (default 1,8)")
    bn.add_argument("--steps", type=_int_list, default=[4], help="comma list in [1, 8] (default 4)")
    bn.add_argument("--resolutions", default="", help="comma list HEIGHTxWIDTH (default: the model's size)")
    bn.add_argument("--warmup", type=int, default=1, help="untimed batches per row (default 1)")
    bn.add_argument("--iters", type=int, default=5, help="timed batches per row (default 5)")
    bn.add_argument("--no-baseline", action="store_true", help="skip diffusers' pipeline")
    bn.add_argument("--device", default="auto")
    bn.add_argument("--dtype", default="auto")
    bn.add_argument("--guidance", type=float, default=None,
                    help="every row's w (default: the model's, 8.0 for a distilled LCM, 1.0 for an LCM-LoRA)")
    bn.add_argument("--cache-dir", default=None, help="ONNX/TensorRT cache (default $LCMSERVE_CACHE_DIR)")
    bn.add_argument("--compile", action="store_true", help="torch.compile inside cuda-graph")
    bn.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="cuda-graph --compile on a GPU: max-autotune-no-cudagraphs (default; minutes of autotuning "
                    "per bucket) or default (library kernels, a short warm-up)")
    bn.add_argument("--channels-last", action="store_true", help="cuda-graph: NHWC convolutions")
    bn.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo", help="onnx: torch.onnx exporter")
    _add_attention(bn)
    bn.add_argument("--threads", type=int, default=None,
                    help="CPU threads of torch and ONNX Runtime (default: theirs; 1 on a shared CPU)")
    bn.add_argument("--baseline-dtype", default=None,
                    help="float32, bfloat16 or float16: diffusers' pipeline in this dtype (default: the bench's own)")
    bn.add_argument("--interleave", action="store_true",
                    help="set up all backends at once and time their batches in turn (fair on a shared machine)")
    bn.add_argument("--profile", action="store_true",
                    help="also profile one batch per row (torch.profiler) and list the top operators")
    bn.add_argument("--profile-top", type=int, default=12,
                    help="--profile: how many operators each row lists (default 12)")
    bn.add_argument("--out", default="docs/results")
    bn.add_argument("--name", default="bench", help="file stem of the results (default bench)")
    bn.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bn.set_defaults(func=cmd_bench, bench_command=None)
    bsub = bn.add_subparsers(dest="bench_command")
    cp = bsub.add_parser("compare", help="merge bench JSON files (several machines/GPUs) into one table and plot")
    cp.add_argument("files", nargs="+", help="bench result JSON files")
    cp.add_argument("--out", default="docs/results")
    cp.add_argument("--name", default="bench-compare")
    at = bsub.add_parser("attention", help="the small-head CPU attention kernel vs torch SDPA, per attention shape "
                         "of a model's UNet and over head dims (JSON, markdown, plot)")
    at.add_argument("--model", default="shapes-lcm", help="model whose UNet's attention shapes are benched")
    at.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32], help="comma list (default 1,8,32)")
    at.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    at.add_argument("--iters", type=int, default=20, help="timed calls per shape (default 20)")
    at.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    at.add_argument("--cache-dir", default=None, help="where the kernel is built (default $LCMSERVE_CACHE_DIR)")
    at.add_argument("--out", default="docs/results")
    at.add_argument("--name", default="attention-cpu")


def cmd_info(args: argparse.Namespace) -> int:
    info = _load(args).describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in value.items())
            print(f"{key:>18}: {value}")
    return 0


def cmd_shapes_train(args: argparse.Namespace) -> int:
    from lcmserve.shapes.train import StageConfig, train

    cfg = StageConfig(
        stage=args.stage, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, bf16=args.bf16, clip_dir=args.clip, vae_dir=args.vae,
        latent_cache=args.latent_cache, init_unet=args.init_unet, warmup_steps=args.warmup_steps,
        device=args.device, num_workers=args.num_workers, max_minutes=args.max_minutes,
        train_text_encoder=args.train_text_encoder, snr_gamma=args.snr_gamma, ema_decay=args.ema_decay,
        compile=args.compile,
    )
    print(f"trained {cfg.stage}: {train(cfg)}")
    return 0


def cmd_shapes_train_speed(args: argparse.Namespace) -> int:
    import math
    from dataclasses import asdict

    from lcmserve.errors import EngineError
    from lcmserve.shapes.speed import markdown, measure, parse_variants
    from lcmserve.shapes.train import check_snr_gamma, resolve_device

    variants = parse_variants(args.variants)
    batch_sizes = args.batch_sizes
    if not batch_sizes or min(batch_sizes) < 1:
        raise InvalidInputError.out_of_range("batch_sizes", batch_sizes, "a comma list of integers >= 1")
    for name in ("seconds", "budget"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise InvalidInputError.out_of_range(name, value, "a finite number of seconds > 0")
    check_snr_gamma(args.snr_gamma)
    device = resolve_device(args.device)
    rows = measure(variants, batch_sizes, device, args.seconds, train_text_encoder=args.train_text_encoder,
                   snr_gamma=args.snr_gamma, log=lambda line: print(line, file=sys.stderr))
    if not rows:
        raise EngineError("train-speed: no variant ran (see the errors above)")
    best = max(rows, key=lambda r: r.samples_in(args.budget))
    print(markdown(rows, args.budget))
    print(f"best for {args.budget:g} s: {best.flags()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "budget_s": args.budget,
                                               "rows": [asdict(r) for r in rows], "best": best.flags()}, indent=2))
    return 0


def cmd_shapes_probe_text(args: argparse.Namespace) -> int:
    from lcmserve.eval.text_probe import probe_text_encoder
    from lcmserve.shapes.bundle import resolve_run

    model = str(resolve_run(args.model, "teacher"))
    result = probe_text_encoder(model, mode=args.mode, layer=args.layer, n_train=args.num_train,
                                n_test=args.num_test, steps=args.steps, progress=True)
    print(json.dumps({"model": model, "mode": args.mode, "layer": args.layer, "steps": args.steps,
                      "exact_scene_accuracy": result}))
    return 0


def cmd_shapes_render(args: argparse.Namespace) -> int:
    from PIL import Image

    from lcmserve.shapes.scenes import caption_for_index, render

    if args.num < 1:
        raise InvalidInputError.out_of_range("num", args.num, "an integer >= 1")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cols = min(args.num, 8)
    grid = Image.new("RGB", (64 * cols, 64 * (-(-args.num // cols))))
    captions = []
    for i in range(args.num):
        scene, text = caption_for_index(i, args.split, args.seed)
        image = render(scene)
        image.save(out / f"{i:05d}.png")
        grid.paste(image, ((i % cols) * 64, (i // cols) * 64))
        captions.append({"file": f"{i:05d}.png", "caption": text})
    grid.save(out / "grid.png")
    (out / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    print(f"wrote {args.num} scenes of split {args.split} to {out}/")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8; got {text!r}") from None


def _names(text: str) -> list[str]:
    """A comma list of names (e.g. samplers), blanks dropped."""
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from lcmserve.eval.run import EvalConfig, run_eval

    cfg = EvalConfig(
        model=args.model, samplers=_names(args.sampler), steps=args.steps,
        guidance=args.guidance, num_images=args.num_images, split=args.split, seed=args.seed,
        batch_size=args.batch_size, out=args.output, clip_dir=args.clip, classifier=args.classifier,
        device=args.device, lora=args.lora,
    )
    result = run_eval(cfg)
    print((Path(cfg.out) / "eval.md").read_text())
    return 0 if result["rows"] else 1


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from lcmserve.eval.compare import compare

    compare(args.files, args.output, args.name, x=args.x, title=args.title, steps=args.steps,
            samplers=_names(args.sampler) if args.sampler else None)
    print((Path(args.output) / f"{args.name}.md").read_text())
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from lcmserve.server.loadtest import compare_batching

    for name in ("requests", "concurrency"):
        if getattr(args, name) < 1:
            raise InvalidInputError.out_of_range(name, getattr(args, name), "an integer >= 1")
    compare_batching(args.model, args.output, requests=args.requests, concurrency=args.concurrency,
                     steps=args.steps, max_queue_rows=args.max_queue_rows)
    print((Path(args.output) / "server-load.md").read_text())
    return 0


def _add_loadtest(sub) -> None:
    lt = sub.add_parser("loadtest", help="bounded loopback load: max_batch_size 1 vs 8 (JSON, markdown, plot)")
    lt.add_argument("--model", default="preset:tiny-sd", help="model the local servers load")
    lt.add_argument("--requests", type=int, default=500)
    lt.add_argument("--concurrency", type=int, default=32)
    lt.add_argument("--steps", type=int, default=4)
    lt.add_argument("--max-queue-rows", type=int, default=64)
    lt.add_argument("-o", "--output", default="docs/results")
    lt.set_defaults(func=cmd_loadtest)


def _add_eval(sub) -> None:
    from lcmserve.eval.sampling import SAMPLERS
    from lcmserve.shapes.scenes import SPLITS

    ev = sub.add_parser("eval", help="FID, CLIP score and attribute accuracy on held-out shapes prompts")
    ev.add_argument("model", help="shapes-teacher, shapes-lcm, or a diffusers folder of the shapes domain")
    ev.add_argument("--sampler", default="lcm", help=f"comma list of {', '.join(SAMPLERS)} (default lcm)")
    ev.add_argument("--steps", type=_int_list, default=[1, 2, 4, 8], help="comma list of step counts")
    ev.add_argument("--guidance", type=float, default=None, help="guidance scale (default 8; 1 with --lora)")
    ev.add_argument("--lora", default=None, help="an LCM-LoRA fused into the model (a base model, e.g. "
                    "shapes-teacher + shapes-lcm-lora) for the lcm sampler")
    ev.add_argument("--num-images", type=int, default=1000, help="prompts per row (default 1000)")
    ev.add_argument("--split", choices=SPLITS, default="heldout", help="prompt split (default heldout)")
    ev.add_argument("--seed", type=int, default=1000, help="first prompt/image seed")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--clip", default=None, help="domain CLIP folder (default: the bundled one)")
    ev.add_argument("--classifier", default=None, help="classifier safetensors (default: the bundled one)")
    ev.add_argument("--device", default="auto", help="where the samplers run: auto (the GPU when there is one), "
                    "cpu, cuda or cuda:N; the judges run on the CPU")
    ev.add_argument("-o", "--output", default="out/eval")
    ev.set_defaults(func=cmd_eval)
    ec = sub.add_parser("eval-compare", help="several `lcmserve eval` results in one table and plot")
    ec.add_argument("files", nargs="+", help="eval output folders or eval.json files, each optionally PATH=LABEL")
    ec.add_argument("--x", choices=("steps", "label"), default="steps",
                    help="steps: metrics against sampling steps (solvers vs LCM); label: against the runs' labels "
                    "(an ablation), with FID against CLIP score")
    ec.add_argument("--title", default="")
    ec.add_argument("--steps", type=_int_list, default=None, help="only these step counts (comma list)")
    ec.add_argument("--sampler", default=None, help=f"only these samplers (comma list of {', '.join(SAMPLERS)})")
    ec.add_argument("--name", default="eval-compare", help="file stem of the results")
    ec.add_argument("-o", "--output", default="out/eval-compare")
    ec.set_defaults(func=cmd_eval_compare)


def cmd_shapes_bundle(args: argparse.Namespace) -> int:
    from lcmserve.shapes.bundle import LORA_FILE, bundle

    for flag in ("clip", "vae", "teacher", "classifier", "lcm", "lora"):
        value = getattr(args, flag)
        if value is not None and value != "shipped" and not Path(value).exists():
            hint = "" if flag in ("lcm", "lora") else " (or give `shipped`)"
            raise InvalidInputError(f"{flag}: run folder {value!r} does not exist{hint}", param=flag)
    if args.lcm is not None and not (Path(args.lcm) / "unet").is_dir():
        raise InvalidInputError(f"lcm: {args.lcm!r} is not a distillation output folder (no unet/)", param="lcm")
    if args.lora is not None and not (Path(args.lora) / LORA_FILE).is_file():
        raise InvalidInputError(f"lora: {args.lora!r} is not a `distill lora` output folder (no {LORA_FILE})",
                                param="lora")
    out = bundle(args.clip, args.vae, args.teacher, args.classifier, args.output, lcm_run=args.lcm,
                 lora_run=args.lora)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"bundled the shapes models in {out} ({size / 2**20:.1f} MiB)")
    return 0


def _add_shapes(sub) -> None:
    from lcmserve.shapes.scenes import SPLITS
    from lcmserve.shapes.train import STAGES

    shapes = sub.add_parser("shapes", help="the bundled shapes domain: render scenes, train its models")
    ssub = shapes.add_subparsers(dest="shapes_command", required=True)
    tr = ssub.add_parser("train", help="train one stage (checkpoints and resume in --out)")
    tr.add_argument("stage", choices=STAGES, help="clip, vae, teacher (needs --clip and --vae) or classifier")
    tr.add_argument("--out", required=True, help="run folder (resumes from its checkpoint.pt)")
    tr.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the stage's default)")
    tr.add_argument("--batch-size", type=int, default=0, help="batch size (0: the stage's default)")
    tr.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0: the stage's default)")
    tr.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    tr.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    tr.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only with native bf16 support)")
    tr.add_argument("--clip", default=None, help="teacher: the trained clip run folder, or `shipped`")
    tr.add_argument("--vae", default=None, help="teacher: the trained vae run folder, or `shipped`")
    tr.add_argument("--latent-cache", type=int, default=20000,
                    help="teacher: training scenes VAE-encoded once up front (0: render and encode every step)")
    tr.add_argument("--init-unet", default=None,
                    help="teacher: start from this UNet (a unet folder or a pipeline folder, e.g. the shipped teacher)")
    tr.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps of the learning rate")
    tr.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    tr.add_argument("--num-workers", type=int, default=0,
                    help="teacher: data-loader processes for captions and noise (and scene rendering)")
    tr.add_argument("--train-text-encoder", action="store_true",
                    help="teacher: train the text encoder with the UNet (shipped in the teacher pipeline)")
    tr.add_argument("--snr-gamma", type=float, default=0.0,
                    help="teacher: Min-SNR loss weighting min(SNR, gamma)/SNR, e.g. 5 (0: plain MSE)")
    tr.add_argument("--ema-decay", type=float, default=0.999, help="teacher: decay of the weights' EMA")
    tr.add_argument("--compile", action="store_true", help="teacher: torch.compile the UNet (GPU; first steps compile)")
    tr.add_argument("--max-minutes", type=float, default=0.0,
                    help="fit the run into this wall time: the step count is cut to the measured speed (0: off)")
    tr.set_defaults(func=cmd_shapes_train)
    sp = ssub.add_parser("train-speed", help="time the teacher's training step per batch size and precision")
    sp.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    sp.add_argument("--batch-sizes", type=_int_list, default="512,1024", help="comma list of batch sizes")
    sp.add_argument("--variants", default="fp32,bf16,bf16+compile",
                    help="comma list of fp32, bf16, fp32+compile, bf16+compile")
    sp.add_argument("--seconds", type=float, default=5.0, help="steady-state seconds timed per variant")
    sp.add_argument("--budget", type=float, default=360.0,
                    help="training seconds the choice is for: the warm-up (compile) is charged against it")
    sp.add_argument("--train-text-encoder", action="store_true", help="time the step with the text encoder trained")
    sp.add_argument("--snr-gamma", type=float, default=0.0, help="time the step with Min-SNR weighting")
    sp.add_argument("--json", default=None, help="also write the rows and the choice to this JSON file")
    sp.set_defaults(func=cmd_shapes_train_speed)
    bd = ssub.add_parser("bundle", help="assemble trained runs into the shipped float16 weights")
    for flag in ("clip", "vae", "teacher", "classifier"):
        bd.add_argument(f"--{flag}", required=True, help=f"the {flag} run folder, or `shipped` to keep the shipped one")
    bd.add_argument("--lcm", default=None, help="also ship this distilled LCM (a `lcmserve distill lcd` output folder)")
    bd.add_argument("--lora", default=None,
                    help="also ship this LCM-LoRA of the teacher (a `lcmserve distill lora` output folder)")
    bd.add_argument("-o", "--output", default=None, help="destination (default: the package's weights folder)")
    bd.set_defaults(func=cmd_shapes_bundle)
    pt = ssub.add_parser("probe-text", help="how much of a scene a probe reads back from a text encoder's states")
    pt.add_argument("model", nargs="?", default="shipped",
                    help="a teacher pipeline folder (its text_encoder/ and tokenizer/), or `shipped`")
    pt.add_argument("--mode", choices=("readout", "deep"), default="readout",
                    help="readout: one cross-attention read-out (about what a UNet layer sees); deep: two "
                    "transformer layers first (what the states hold at all)")
    pt.add_argument("--layer", type=int, default=-1, help="hidden state to probe (-1: the output, as the UNet "
                    "sees it; 0: the token embeddings)")
    pt.add_argument("--steps", type=int, default=2500)
    pt.add_argument("--num-train", type=int, default=20000)
    pt.add_argument("--num-test", type=int, default=2000)
    pt.set_defaults(func=cmd_shapes_probe_text)
    rd = ssub.add_parser("render", help="render captioned scenes (PNG files, captions.jsonl, grid.png)")
    rd.add_argument("--split", choices=SPLITS, default="train")
    rd.add_argument("-n", "--num", type=int, default=64, help="number of scenes")
    rd.add_argument("--seed", type=int, default=0)
    rd.add_argument("-o", "--output", default="out/shapes")
    rd.set_defaults(func=cmd_shapes_render)


def cmd_serve(args: argparse.Namespace) -> int:
    from lcmserve.server.app import serve
    from lcmserve.server.config import ServerConfig

    return serve(ServerConfig.load(args, os.environ))


def _add_serve(sub) -> None:
    from lcmserve.server.config import add_arguments

    sv = sub.add_parser("serve", help="serve the model over REST (OpenAI-compatible too), gRPC and /metrics",
                        description="Every flag also reads LCMSERVE_<FLAG> from the environment; flags win.")
    add_arguments(sv)
    sv.set_defaults(func=cmd_serve)


def cmd_distill(args: argparse.Namespace) -> int:
    from lcmserve.distill import distill
    from lcmserve.distill.config import from_args

    result = distill(from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:  # once, not per process under torchrun / accelerate launch
        print(f"distilled ({args.mode}) steps {result.start_step}..{result.steps} in {result.wall_s:.0f} s: "
              f"{result.out}")
    return 0


def _add_distill(sub) -> None:
    from lcmserve.distill.config import add_arguments

    ds = sub.add_parser("distill", help="distil a teacher into an LCM (lcd), an LCM-LoRA (lora), or fine-tune an "
                        "LCM (lcf); resumable, multi-process with accelerate launch / torchrun",
                        description="See docs/distill.md. Re-running with the same --out resumes from its newest "
                        "checkpoint.")
    add_arguments(ds)
    ds.set_defaults(func=cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    from lcmserve.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="lcmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lcmserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="the text prompt")
    _add_model_args(gen, DEFAULT_MODEL)
    gen.add_argument("--steps", type=int, default=4, help="LCM steps, 1-8 (default 4)")
    gen.add_argument("--guidance", "--guidance-scale", dest="guidance", type=float, default=None,
                     help="guidance scale w in [0, 50] (default: the model's, 8.0 for a distilled LCM, 1.0 with "
                          "--lora, whose useful range is 1-2)")
    gen.add_argument("--negative-prompt", default="",
                     help="what guidance steers away from (models with classifier-free guidance, e.g. a base model "
                          "with --lora, at --guidance > 1)")
    gen.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i")
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1)")
    gen.add_argument("--width", type=int, default=None, help="pixels, multiple of 8 (default: the model's size)")
    gen.add_argument("--height", type=int, default=None, help="pixels, multiple of 8 (default: the model's size)")
    gen.add_argument("--batch-size", type=int, default=8, help="rows per UNet batch (default 8)")
    gen.add_argument("--format", choices=["png", "jpeg", "webp"], default="png", help="image file format")
    gen.add_argument("-o", "--output", default="out", help="output folder (default out/)")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--backend", choices=["torch", "compiled", "cuda-graph", "onnx", "tensorrt"], default="torch",
                     help="engine backend (default torch, the eager reference)")
    gen.add_argument("--cache-dir", default=None,
                     help="ONNX/TensorRT cache (default $LCMSERVE_CACHE_DIR or ~/.cache/lcmserve)")
    gen.add_argument("--compile", action="store_true", help="cuda-graph: torch.compile the UNet and VAE")
    gen.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                     help="cuda-graph --compile: max-autotune-no-cudagraphs (default) or default (a short warm-up)")
    gen.add_argument("--channels-last", action="store_true", help="cuda-graph: NHWC convolutions")
    gen.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo", help="onnx: torch.onnx exporter")
    _add_attention(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe a model: family, guidance mode, sizes, parameter counts")
    _add_model_args(info, None)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    _add_shapes(sub)
    _add_eval(sub)
    _add_serve(sub)
    _add_loadtest(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_distill(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    if args.command == "generate" and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1; got {args.batch_size}")
    try:
        return args.func(args)
    except LCMServeError as exc:
        flag = f"--{exc.param.replace('_', '-')}" if exc.param else ""
        print(f"lcmserve: error: {exc.message}" + (f" (see {flag})" if flag else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
