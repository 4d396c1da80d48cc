"""Make an LCM: ``distill`` (LCD, LCM-LoRA or LCF), its flags generated from DistillConfig's fields."""

from __future__ import annotations

import argparse
import os


def add(sub) -> None:
    _add_distill(sub)


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
