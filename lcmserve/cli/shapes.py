"""The bundled shapes domain: ``shapes render | train | train-speed | bundle | probe-text | check-vae``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lcmserve.cli.common import int_list
from lcmserve.errors import InvalidInputError


def add(sub) -> None:
    _add_shapes(sub)


def cmd_shapes_train(args: argparse.Namespace) -> int:
    from lcmserve.shapes.train import StageConfig, train

    cfg = StageConfig(
        stage=args.stage, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, bf16=args.bf16, clip_dir=args.clip, vae_dir=args.vae,
        latent_cache=args.latent_cache, init_unet=args.init_unet, warmup_steps=args.warmup_steps,
        device=args.device, num_workers=args.num_workers, max_minutes=args.max_minutes,
        train_text_encoder=args.train_text_encoder, snr_gamma=args.snr_gamma, ema_decay=args.ema_decay,
        compile=args.compile, decoder_only=args.decoder_only, fg_weight=args.fg_weight, ring_weight=args.ring_weight,
        full_captions=args.full_captions, unplaced_captions=args.unplaced_captions,
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


def cmd_shapes_check_vae(args: argparse.Namespace) -> int:
    from lcmserve.eval.reconstruct import check_vae
    from lcmserve.shapes.bundle import model_dir, resolve_run

    if not 8 <= args.num <= 100_000:
        raise InvalidInputError.out_of_range("num", args.num, "an integer in [8, 100000]")
    vae = model_dir(resolve_run(args.vae, "vae"))
    if not (vae / "config.json").is_file():
        raise InvalidInputError(f"vae: {args.vae!r} is not a VAE folder or vae run folder", param="vae")
    report = check_vae(vae, args.num, out=args.output)
    r = report.reconstructions
    print(f"{report.num_images} held-out reconstructions read exactly right: {r['accuracy']:.3f} (shape "
          f"{r['shape']:.3f}, colour {r['colour']:.3f}, size {r['size']:.3f}); renders: "
          f"{report.renders['accuracy']:.3f}; mean abs pixel error {report.mean_abs_error:.4f}; {args.output}/")
    return 0


def cmd_shapes_render(args: argparse.Namespace) -> int:
    from PIL import Image

    from lcmserve.shapes.language import caption_for
    from lcmserve.shapes.scenes import caption_for_index, render

    if args.num < 1:
        raise InvalidInputError.out_of_range("num", args.num, "an integer >= 1")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cols = min(args.num, 8)
    grid = Image.new("RGB", (64 * cols, 64 * (-(-args.num // cols))))
    captions = []
    for i in range(args.num):
        if args.captions == "language":
            scene, text, spec = caption_for(i, args.split, args.seed)
            row = {"caption": text, "states": spec.to_dict()}
        else:
            scene, text = caption_for_index(i, args.split, args.seed)
            row = {"caption": text}
        image = render(scene, style=args.style)
        image.save(out / f"{i:05d}.png")
        grid.paste(image, ((i % cols) * 64, (i // cols) * 64))
        captions.append({"file": f"{i:05d}.png", **row})
    grid.save(out / "grid.png")
    (out / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    print(f"wrote {args.num} scenes of split {args.split} to {out}/")
    return 0


def cmd_shapes_bundle(args: argparse.Namespace) -> int:
    from lcmserve.shapes.bundle import LORA_FILE, bundle

    for flag in ("clip", "vae", "teacher", "classifier", "lcm", "lora", "shifted"):
        value = getattr(args, flag)
        if value is not None and value != "shipped" and not Path(value).exists():
            hint = "" if flag in ("lcm", "lora", "shifted") else " (or give `shipped`)"
            raise InvalidInputError(f"{flag}: run folder {value!r} does not exist{hint}", param=flag)
    if args.lcm is not None and not (Path(args.lcm) / "unet").is_dir():
        raise InvalidInputError(f"lcm: {args.lcm!r} is not a distillation output folder (no unet/)", param="lcm")
    for flag, command in (("lora", "distill lora"), ("shifted", "distill lcf --lcf-adapter")):
        value = getattr(args, flag)
        if value is not None and not (Path(value) / LORA_FILE).is_file():
            raise InvalidInputError(f"{flag}: {value!r} is not a `{command}` output folder (no {LORA_FILE})",
                                    param=flag)
    out = bundle(args.clip, args.vae, args.teacher, args.classifier, args.output, lcm_run=args.lcm,
                 lora_run=args.lora, shifted_run=args.shifted)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"bundled the shapes models in {out} ({size / 2**20:.1f} MiB)")
    return 0


def _add_shapes(sub) -> None:
    shapes = sub.add_parser("shapes", help="the bundled shapes domain: render scenes, train, time and bundle its "
                            "models, probe its text encoder")
    ssub = shapes.add_subparsers(dest="shapes_command", required=True)
    _add_render(ssub)
    _add_train(ssub)
    _add_train_speed(ssub)
    _add_bundle(ssub)
    _add_probe_text(ssub)
    ck = ssub.add_parser("check-vae", help="how well the judge reads a VAE's reconstructions of held-out scenes")
    ck.add_argument("vae", nargs="?", default="shipped", help="a VAE folder or vae run folder, or `shipped`")
    ck.add_argument("-n", "--num", type=int, default=400, help="held-out scenes (default 400)")
    ck.add_argument("-o", "--output", default="out/vae-check", help="vae-check.json/.md and a grid of renders "
                    "above their reconstructions")
    ck.set_defaults(func=cmd_shapes_check_vae)


def _add_train(ssub) -> None:
    from lcmserve.shapes.train import STAGES

    tr = ssub.add_parser("train", help="train one stage (checkpoints and resume in --out)")
    tr.add_argument("stage", choices=STAGES, help="clip, vae, teacher (needs --clip and --vae) or classifier")
    tr.add_argument("--out", required=True, help="run folder (resumes from its checkpoint.pt)")
    tr.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the stage's default)")
    tr.add_argument("--batch-size", type=int, default=0, help="batch size (0: the stage's default)")
    tr.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0: the stage's default)")
    tr.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    tr.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    tr.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only with native bf16 support)")
    tr.add_argument("--clip", default=None, help="teacher: the trained clip run folder, or `shipped`; "
                    "clip: start from this one")
    tr.add_argument("--vae", default=None, help="teacher: the trained vae run folder, or `shipped`; "
                    "vae: start from this one")
    tr.add_argument("--decoder-only", action="store_true",
                    help="vae: train the decoder alone (the latent space, and every model trained on it, stays)")
    tr.add_argument("--fg-weight", type=float, default=10.0, help="vae: weight of object pixels in the loss")
    tr.add_argument("--ring-weight", type=float, default=1.0,
                    help="vae: weight of background pixels within 3 px of an object (halos, specks) in the loss")
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
    tr.add_argument("--full-captions", type=float, default=0.0,
                    help="teacher: share of captions replaced by the full template caption of the scene, which "
                         "states every attribute (0-1; 0: the caption language alone)")
    tr.add_argument("--unplaced-captions", type=float, default=0.0,
                    help="teacher: share of two-object scenes captioned without the place of one object or of "
                         "both, the prompts models find hardest (0-1; applied after --full-captions)")
    tr.add_argument("--ema-decay", type=float, default=0.999, help="teacher: decay of the weights' EMA")
    tr.add_argument("--compile", action="store_true", help="teacher: torch.compile the UNet (GPU; first steps compile)")
    tr.add_argument("--max-minutes", type=float, default=0.0,
                    help="fit the run into this wall time: the step count is cut to the measured speed (0: off)")
    tr.set_defaults(func=cmd_shapes_train)


def _add_train_speed(ssub) -> None:
    sp = ssub.add_parser("train-speed", help="time the teacher's training step per batch size and precision")
    sp.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    sp.add_argument("--batch-sizes", type=int_list, default="512,1024", help="comma list of batch sizes")
    sp.add_argument("--variants", default="fp32,bf16,bf16+compile",
                    help="comma list of fp32, bf16, fp32+compile, bf16+compile")
    sp.add_argument("--seconds", type=float, default=5.0, help="steady-state seconds timed per variant")
    sp.add_argument("--budget", type=float, default=360.0,
                    help="training seconds the choice is for: the warm-up (compile) is charged against it")
    sp.add_argument("--train-text-encoder", action="store_true", help="time the step with the text encoder trained")
    sp.add_argument("--snr-gamma", type=float, default=0.0, help="time the step with Min-SNR weighting")
    sp.add_argument("--json", default=None, help="also write the rows and the choice to this JSON file")
    sp.set_defaults(func=cmd_shapes_train_speed)


def _add_bundle(ssub) -> None:
    bd = ssub.add_parser("bundle", help="assemble trained runs into the shipped float16 weights")
    for flag in ("clip", "vae", "teacher", "classifier"):
        bd.add_argument(f"--{flag}", required=True, help=f"the {flag} run folder, or `shipped` to keep the shipped one")
    bd.add_argument("--lcm", default=None, help="also ship this distilled LCM (a `lcmserve distill lcd` output folder)")
    bd.add_argument("--lora", default=None,
                    help="also ship this LCM-LoRA of the teacher (a `lcmserve distill lora` output folder)")
    bd.add_argument("--shifted", default=None,
                    help="also ship this style adapter of the LCM, served as `shifted` (a `lcmserve distill lcf "
                         "--lcf-adapter --caption-rewrite shapes-shifted` output folder, on the LCM shipped with it)")
    bd.add_argument("-o", "--output", default=None, help="destination (default: the package's weights folder)")
    bd.set_defaults(func=cmd_shapes_bundle)


def _add_probe_text(ssub) -> None:
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


def _add_render(ssub) -> None:
    from lcmserve.shapes.scenes import SPLITS, STYLES

    rd = ssub.add_parser("render", help="render captioned scenes (PNG files, captions.jsonl, grid.png)")
    rd.add_argument("--split", choices=SPLITS, default="train")
    rd.add_argument("-n", "--num", type=int, default=64, help="number of scenes")
    rd.add_argument("--seed", type=int, default=0)
    rd.add_argument("--captions", choices=("template", "language"), default="template",
                    help="the full template captions, or captions of the caption language with what each states")
    rd.add_argument("--style", choices=STYLES, default="plain",
                    help="as stated, or in the shifted palette (each colour one hue step on: the style adapter's "
                    "training data)")
    rd.add_argument("-o", "--output", default="out/shapes")
    rd.set_defaults(func=cmd_shapes_render)
