"""Judge a shapes model: ``eval`` (FID, CLIP score, attribute accuracy) and ``eval-compare`` (runs side by side)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lcmserve.cli.common import int_list, names


def add(sub) -> None:
    _add_eval(sub)


def cmd_eval(args: argparse.Namespace) -> int:
    from lcmserve.eval.run import EvalConfig, run_eval

    cfg = EvalConfig(
        model=args.model, samplers=names(args.sampler), steps=args.steps,
        guidance=args.guidance, num_images=args.num_images, suites=names(args.suite), seed=args.seed,
        batch_size=args.batch_size, out=args.output, clip_dir=args.clip, classifier=args.classifier,
        device=args.device, lora=args.lora, adapter=args.adapter, style=args.style,
    )
    result = run_eval(cfg)
    print((Path(cfg.out) / "eval.md").read_text())
    return 0 if result["rows"] else 1


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from lcmserve.eval.compare import compare

    compare(args.files, args.output, args.name, x=args.x, title=args.title, steps=args.steps,
            samplers=names(args.sampler) if args.sampler else None)
    print((Path(args.output) / f"{args.name}.md").read_text())
    return 0


def _add_eval(sub) -> None:
    from lcmserve.eval.sampling import SAMPLERS
    from lcmserve.eval.suites import SUITES
    from lcmserve.shapes.scenes import STYLES

    ev = sub.add_parser("eval", help="FID, CLIP score and accuracy on what shapes prompts state, per prompt suite")
    ev.add_argument("model", help="shapes-teacher, shapes-lcm, or a diffusers folder of the shapes domain")
    ev.add_argument("--sampler", default="lcm", help=f"comma list of {', '.join(SAMPLERS)} (default lcm)")
    ev.add_argument("--steps", type=int_list, default=[1, 2, 4, 8], help="comma list of step counts")
    ev.add_argument("--guidance", type=float, default=None, help="guidance scale (default 8; 1 with --lora)")
    ev.add_argument("--adapter", default=None, help="a LoRA every prompt names per request, unfused, at scale 1 "
                    "(a style adapter; the shifted column reads the shifted palette)")
    ev.add_argument("--style", choices=STYLES, default="plain", help="the style the images should be in "
                    "(accuracy is scored against what that style draws of each prompt)")
    ev.add_argument("--lora", default=None, help="an LCM-LoRA fused into the model (a base model, e.g. "
                    "shapes-teacher + shapes-lcm-lora) for the lcm sampler")
    ev.add_argument("--num-images", type=int, default=1000, help="prompts per suite (default 1000; wild has 400)")
    ev.add_argument("--suite", default="heldout", help=f"comma list of prompt suites: {', '.join(SUITES)} "
                    "(default heldout; docs/shapes.md)")
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
    ec.add_argument("--steps", type=int_list, default=None, help="only these step counts (comma list)")
    ec.add_argument("--sampler", default=None, help=f"only these samplers (comma list of {', '.join(SAMPLERS)})")
    ec.add_argument("--name", default="eval-compare", help="file stem of the results")
    ec.add_argument("-o", "--output", default="out/eval-compare")
    ec.set_defaults(func=cmd_eval_compare)
