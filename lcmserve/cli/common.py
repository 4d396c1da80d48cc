"""Flags and parsers that several command groups share."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    """The model to load: positional without a default, else ``--model``; adapters, device and dtype."""
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
    p.add_argument("--dtype", default="auto",
                   help="auto, float32, bfloat16 or float16 (auto: with --backend auto, the dtype its rule picks, "
                        "bfloat16 on a CPU with bfloat16 instructions; otherwise fp16 on GPU, fp32 on CPU)")


def load_model_from_args(args: argparse.Namespace):
    from lcmserve.models import load_model

    return load_model(args.model, lora=args.lora, lora_scale=args.lora_scale, unet=args.unet, vae=args.vae,
                      device=args.device, dtype=args.dtype)


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    """What the accelerated backends take: their cache, torch.compile, memory layout, exporter, attention."""
    from lcmserve.engine.kernels.attention import ATTENTION_CHOICES

    parser.add_argument("--cache-dir", default=None,
                        help="ONNX graphs, TensorRT engines, kernels and inductor's code (default $LCMSERVE_CACHE_DIR "
                             "or ~/.cache/lcmserve; inductor's: $TORCHINDUCTOR_CACHE_DIR when set)")
    parser.add_argument("--compile", action="store_true", help="cuda-graph: torch.compile the UNet and VAE")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        help="cuda-graph --compile on a GPU: max-autotune-no-cudagraphs (default; minutes of "
                        "autotuning per bucket) or default (library kernels, a short warm-up)")
    parser.add_argument("--channels-last", action="store_true", help="cuda-graph: NHWC convolutions")
    add_exporter(parser)
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                        help="auto (default): small-head where it pays (a torch-executed backend on a CPU, a model "
                             "with small heads), else sdpa; sdpa: torch's scaled_dot_product_attention; small-head: "
                             "our CPU kernel for heads of up to 16 channels, or 24 over at most 80 keys (the shapes "
                             "models), built with the C compiler on first use")


def add_exporter(parser: argparse.ArgumentParser, help: str = "onnx: torch.onnx exporter") -> None:
    from lcmserve.engine.export import EXPORTERS

    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help=help)


def int_list(text: str) -> list[int]:
    """A comma list of integers (an argparse type)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8; got {text!r}") from None


def names(text: str) -> list[str]:
    """A comma list of names (e.g. samplers), blanks dropped."""
    return [s.strip() for s in text.split(",") if s.strip()]
