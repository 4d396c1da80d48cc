"""Run a model: ``generate`` images, ``info`` on a model, ``export`` it to ONNX, ``bench`` the backends."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lcmserve import __version__
from lcmserve.cli.common import add_backend_flags, add_exporter, add_model_args, int_list, load_model_from_args, names

logger = logging.getLogger("lcmserve.cli")


def add(sub) -> None:
    _add_generate(sub)
    _add_info(sub)
    _add_export(sub)
    _add_bench(sub)


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
    choice = _choose(args)
    model = load_model_from_args(args)
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
        "backend": choice.describe() if choice else {"backend": args.backend, "dtype": model.dtype_name,
                                                     "attention": args.attention},
        "times_s": {"text": result.times.text_s, "unet": result.times.unet_s, "vae": result.times.vae_s,
                    "total_with_load": time.perf_counter() - started},
    }
    (out_dir / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(files)} image(s) to {out_dir}/ ({', '.join(files)})")
    return 0


def _choose(args: argparse.Namespace):
    """``--backend auto``: the backend, dtype and attention its rule picks for a one-off run, written into ``args``
    before the model loads in that dtype; None for a named backend."""
    if args.backend != "auto":
        return None
    from lcmserve.engine.backends import choose_before_load

    choice = choose_before_load(args.model, unet=args.unet, device=args.device, dtype=args.dtype,
                                attention=args.attention, one_off=True)
    args.backend, args.dtype, args.attention = choice.backend, choice.dtype, choice.attention
    return choice


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


def _add_generate(sub) -> None:
    from lcmserve.engine.backends import BACKEND_CHOICES
    from lcmserve.models import DEFAULT_MODEL

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="the text prompt")
    add_model_args(gen, DEFAULT_MODEL)
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
    gen.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                     help="engine backend (default auto: the dtype and attention that pay on this machine, eager "
                          "torch for a one-off run, whose images cost less than compiling; torch is the reference)")
    add_backend_flags(gen)
    gen.set_defaults(func=cmd_generate)


def cmd_info(args: argparse.Namespace) -> int:
    info = load_model_from_args(args).describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in value.items())
            print(f"{key:>18}: {value}")
    return 0


def _add_info(sub) -> None:
    info = sub.add_parser("info", help="describe a model: family, guidance mode, sizes, parameter counts")
    add_model_args(info, None)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)


def cmd_export(args: argparse.Namespace) -> int:
    from lcmserve.engine.cache import default_cache_dir
    from lcmserve.engine.export import export_model, write_export_index

    model = load_model_from_args(args)
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
    ex = sub.add_parser("export", help="export text encoder(s), UNet and VAE decoder to ONNX (dynamic batch), cached")
    add_model_args(ex, None)
    ex.add_argument("--out", default=None, help="cache folder (default: $LCMSERVE_CACHE_DIR or ~/.cache/lcmserve)")
    ex.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    ex.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    add_exporter(ex, help="torch.onnx exporter: dynamo (default) or legacy (TorchScript tracer, faster, deprecated)")
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
    if args.bench_command == "adapters":
        from lcmserve.engine.bench_adapters import AdapterBenchConfig, run_adapter_bench

        run_adapter_bench(AdapterBenchConfig(
            model=args.model, adapters=args.adapters, rank=args.rank, steps=args.steps, iters=args.iters,
            threads=args.threads, out=args.out, name=args.name))
        print((Path(args.out) / f"{args.name}.md").read_text())
        return 0
    cfg = BenchConfig(
        model=args.model, vae=args.vae, lora=args.lora, lora_scale=args.lora_scale, unet=args.unet,
        backends=tuple(names(args.backends)), batch_sizes=tuple(args.batch_sizes), steps=tuple(args.steps),
        resolutions=parse_resolutions(args.resolutions), warmup=args.warmup, iters=args.iters,
        baseline=not args.no_baseline, device=args.device, dtype=args.dtype, guidance=args.guidance,
        cache_dir=args.cache_dir, compile=args.compile, compile_mode=args.compile_mode,
        channels_last=args.channels_last, exporter=args.exporter, threads=args.threads,
        baseline_dtype=args.baseline_dtype, interleave=args.interleave, profile=args.profile,
        profile_top=args.profile_top, attention=args.attention, out=args.out, name=args.name, progress=not args.quiet,
    )
    result = run_bench(cfg)
    print((Path(cfg.out) / f"{cfg.name}.md").read_text())
    if not result["rows"]:
        print("error: no backend produced a measurement (see the failures above)", file=sys.stderr)
        return 1
    return 0


def _add_bench(sub) -> None:
    from lcmserve.engine.backends import BACKENDS
    from lcmserve.engine.bench import DEFAULT_ROW
    from lcmserve.models import DEFAULT_MODEL

    bn = sub.add_parser("bench", help="latency/throughput of the backends vs diffusers (JSON, markdown, plot); "
                        "`bench compare A.json B.json` merges runs",
                        description="--lora, --unet and --vae change the model for ours and diffusers' pipeline "
                        "alike.")
    add_model_args(bn, DEFAULT_MODEL)
    bn.add_argument("--backends", default=DEFAULT_ROW,
                    help=f"comma list of {DEFAULT_ROW} (what --backend auto picks for a server: backend, dtype and "
                         f"attention, on its own copy of the weights) and " + ", ".join(BACKENDS)
                         + f" (default {DEFAULT_ROW}); --attention auto: the named ones run sdpa")
    bn.add_argument("--batch-sizes", type=int_list, default=[1, 8], help="comma list in [1, 32] (default 1,8)")
    bn.add_argument("--steps", type=int_list, default=[4], help="comma list in [1, 8] (default 4)")
    bn.add_argument("--resolutions", default="", help="comma list HEIGHTxWIDTH (default: the model's size)")
    bn.add_argument("--warmup", type=int, default=1, help="untimed batches per row (default 1)")
    bn.add_argument("--iters", type=int, default=5, help="timed batches per row (default 5)")
    bn.add_argument("--no-baseline", action="store_true", help="skip diffusers' pipeline")
    bn.add_argument("--guidance", type=float, default=None,
                    help="every row's w (default: the model's, 8.0 for a distilled LCM, 1.0 for an LCM-LoRA)")
    add_backend_flags(bn)
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
    at.add_argument("--model", default=DEFAULT_MODEL, help="model whose UNet's attention shapes are benched")
    at.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="comma list (default 1,8,32)")
    at.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    at.add_argument("--iters", type=int, default=20, help="timed calls per shape (default 20)")
    at.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    at.add_argument("--cache-dir", default=None, help="where the kernel is built (default $LCMSERVE_CACHE_DIR)")
    at.add_argument("--out", default="docs/results")
    at.add_argument("--name", default="attention-cpu")
    ad = bsub.add_parser("adapters", help="rows over several LoRA adapters in one batch against one fused adapter "
                         "and against one batch per adapter (JSON, markdown, plot)")
    ad.add_argument("--model", default=DEFAULT_MODEL, help="model the random adapters are made for")
    ad.add_argument("--adapters", type=int, default=4, help="how many adapters, 2 rows each (default 4)")
    ad.add_argument("--rank", type=int, default=16, help="rank of every adapter (default 16)")
    ad.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    ad.add_argument("--iters", type=int, default=10, help="timed rounds, each way once per round (default 10)")
    ad.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ad.add_argument("--out", default="docs/results")
    ad.add_argument("--name", default="bench-adapters-cpu")
