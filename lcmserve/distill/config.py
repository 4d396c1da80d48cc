"""The one configuration of a distillation run: LCD, LCM-LoRA or LCF.

Every field is documented in its ``help`` metadata; the ``lcmserve distill`` command line is
generated from these fields, and every run saves the resolved config beside its weights.
Values are checked at construction; checks that need the teacher folder or the data
(schedule length, image folders) run in ``distill.train.check_inputs`` before any training.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from lcmserve.errors import InvalidInputError

# The files a run folder holds beside the model: the resolved config, and a summary written at the end.
CONFIG_FILE = "distill-config.json"
SUMMARY_FILE = "distill.json"

MODES = ("lcd", "lora", "lcf")
SOLVERS = ("ddim", "dpmsolver", "dpmsolver++")
LOSSES = ("l2", "huber")
MIXED_PRECISION = ("no", "fp16", "bf16")
# The learning rate each mode starts from when lr is left at 0: the LCM paper's 8e-6 for the
# full UNet (LCD, LCF) and the LCM-LoRA recipe's 1e-4 for the adapter.
DEFAULT_LR = {"lcd": 8e-6, "lcf": 8e-6, "lora": 1e-4}
# diffusers' LCM-LoRA recipe: attention, feed-forward, resnet convs, resampling convs, time projections.
DEFAULT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DistillConfig:
    """One distillation run. w follows the LCM paper: the teacher's guided prediction is (1 + w) cond - w uncond,
    which diffusers and ``lcmserve generate`` call guidance scale w + 1."""

    mode: str = _f("lcd", "lcd (full UNet + guidance embedding), lora (LCM-LoRA adapter) or lcf (fine-tune an LCM)",
                   choices=MODES, positional=True)
    teacher: str = _f("", "diffusers folder of the teacher (lcd, lora) or of the LCM to fine-tune (lcf)",
                      required=True)
    out: str = _f("", "run folder: checkpoints/, samples/, the config, and the final model", required=True)
    data: str = _f("shapes", "a registered generator (shapes: the scene generator; shapes-shifted: the same scenes "
                   "in the shifted palette), an image+caption folder, or webdataset tar shards (a .tar file, a "
                   "folder of them, a glob, or a comma list)")
    resolution: int = _f(0, "training resolution in pixels (0: the teacher's native size)")
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(8, "images per process and step (the global batch is batch_size x processes)")
    lr: float = _f(0.0, "learning rate (0: 8e-6 for lcd/lcf, 1e-4 for lora)")
    lr_warmup_steps: int = _f(0, "linear warm-up steps, then constant")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    skipping_step: int = _f(20, "skipping step k: t_{n+k} -> t_n; must divide the schedule length (1000)")
    solver: str = _f("ddim", "ODE solver of the teacher step: ddim, dpmsolver (2nd order) or dpmsolver++ (2S)",
                     choices=SOLVERS)
    w_min: float = _f(2.0, "lowest guidance scale w sampled (paper convention; diffusers' scale is w + 1)")
    w_max: float = _f(14.0, "highest guidance scale w sampled")
    lora_w: float = _f(7.0, "lora: the fixed w the adapter learns (serve it with guidance scale 1)")
    time_cond_proj_dim: int = _f(256, "lcd: width of the student's guidance embedding")
    init_student: str = _f("", "lcd: start the student from this LCM (a pipeline folder with unet/, or a unet "
                           "folder) of the teacher's architecture instead of the teacher's UNet")
    ema_decay: float = _f(0.95, "EMA rate of the target network (lcd, lcf); lora: 0 uses the online adapter")
    loss: str = _f("l2", "distance: l2 or huber", choices=LOSSES)
    huber_c: float = _f(1e-3, "Huber constant c of sqrt(d^2 + c^2) - c")
    mixed_precision: str = _f("no", "no, fp16 (GPU) or bf16", choices=MIXED_PRECISION)
    lcf_adapter: bool = _f(False, "lcf: train a LoRA (lora_rank, lora_alpha, lora_targets) on the LCM instead of all "
                           "its weights, and save it as an adapter file: a style for serve --adapter")
    caption_rewrite: str = _f("", "lcf adapter: distil the adapter from the LCM itself instead of fine-tuning on "
                              "the data: for a caption c it learns to draw what the LCM draws for the registered "
                              "rewrite of c (shapes-shifted: each colour one hue step on); the data's images only "
                              "place the noisy inputs ('': consistency fine-tuning)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, slower)")
    cpu: bool = _f(False, "train on the CPU even when a GPU is visible")
    tf32: bool = _f(True, "TF32 matrix units for the float32 work on a GPU (Ampere and newer)")
    seed: int = _f(0, "seed of every random draw (data order, t, w, noise): a pure function of (seed, step, rank)")
    checkpoint_every: int = _f(100, "steps between checkpoints (and at the end)")
    checkpoints_keep: int = _f(2, "how many checkpoints to keep")
    samples: int = _f(4, "images per sample grid in samples/ (0: no grids)")
    sample_every: int = _f(0, "steps between sample grids (0: only at the end)")
    sample_steps: int = _f(4, "LCM steps of the sample grids")
    sample_prompts: list = _f([], "prompts of the sample grids (default: the first captions of the data)")
    lora_rank: int = _f(64, "lora: adapter rank")
    lora_alpha: int = _f(64, "lora: adapter alpha (scale alpha / rank)")
    lora_targets: list = _f(list(DEFAULT_LORA_TARGETS), "lora: module names that get adapters")
    cache: str = _f("", "file of pre-encoded latents + text states, built once and reused across epochs")
    overfit_batches: int = _f(0, "debugging aid: repeat the data and draws of the first N steps (0: off)")
    num_samples: int = _f(0, "shapes: size of a fixed scene set (0: a new scene every draw; needed with --cache)")
    max_minutes: float = _f(0.0, "stop after this wall time (minutes from the start) with a checkpoint and the "
                            "final model, even short of --steps (0: off)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError.out_of_range("mode", self.mode, "one of " + ", ".join(MODES))
        for name, allowed in (("solver", SOLVERS), ("loss", LOSSES), ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, name) not in allowed:
                raise InvalidInputError.out_of_range(name, getattr(self, name), "one of " + ", ".join(allowed))
        for name in ("teacher", "out", "data"):
            if not str(getattr(self, name)).strip():
                raise InvalidInputError(f"{name}: required; got an empty value", param=name)
        for name in ("steps", "batch_size", "checkpoint_every", "checkpoints_keep", "skipping_step",
                     "time_cond_proj_dim", "lora_rank", "lora_alpha"):
            _positive_int(name, getattr(self, name))
        for name in ("resolution", "lr_warmup_steps", "samples", "sample_every", "num_samples", "overfit_batches"):
            _positive_int(name, getattr(self, name), minimum=0)
        if self.resolution and self.resolution % 8:
            raise InvalidInputError.out_of_range("resolution", self.resolution, "a multiple of 8 (or 0)")
        if not 1 <= self.sample_steps <= 8:
            raise InvalidInputError.out_of_range("sample_steps", self.sample_steps, "an integer in [1, 8]")
        for name in ("w_min", "w_max", "lora_w", "weight_decay", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidInputError.out_of_range(name, value, "a finite number >= 0")
        if self.w_min > self.w_max:
            raise InvalidInputError(
                f"w_min must be <= w_max; got w_min={self.w_min}, w_max={self.w_max}", param="w_min"
            )
        if not 0 <= self.ema_decay < 1:
            raise InvalidInputError.out_of_range("ema_decay", self.ema_decay, "in [0, 1)")
        if self.ema_decay == 0 and self.mode != "lora":
            raise InvalidInputError.out_of_range(
                "ema_decay", self.ema_decay, f"in (0, 1) for mode {self.mode} (the target network is an EMA)"
            )
        if not (self.huber_c > 0 and math.isfinite(self.huber_c)):
            raise InvalidInputError.out_of_range("huber_c", self.huber_c, "a finite number > 0")
        if not (self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise InvalidInputError.out_of_range("max_minutes", self.max_minutes, "a finite number >= 0 (0: off)")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise InvalidInputError.out_of_range("max_grad_norm", self.max_grad_norm, "a finite number > 0")
        if self.lcf_adapter and self.mode != "lcf":
            raise InvalidInputError(f"lcf_adapter: only mode lcf trains an adapter on an LCM; got mode {self.mode} "
                                    "(mode lora distils an LCM-LoRA from a teacher)", param="lcf_adapter")
        if self.caption_rewrite:
            from lcmserve.models.registry import caption_rewrite_names

            if not self.lcf_adapter:
                raise InvalidInputError("caption_rewrite: distils an adapter on an LCM; it needs mode lcf with "
                                        "lcf_adapter", param="caption_rewrite")
            names = caption_rewrite_names()
            if self.caption_rewrite not in names:
                raise InvalidInputError.out_of_range("caption_rewrite", self.caption_rewrite,
                                                     "one of " + (", ".join(names) or "(none registered)"))
        if self.init_student and self.mode != "lcd":
            raise InvalidInputError(f"init_student: only mode lcd starts from another LCM; got mode {self.mode}",
                                    param="init_student")
        if not self.lr:
            self.lr = DEFAULT_LR[self.mode]
        from lcmserve.models.registry import data_source_names

        if self.cache and self.data in data_source_names() and not self.num_samples:
            raise InvalidInputError(
                f"num_samples: a latent cache of the {self.data} generator needs a fixed scene set; set num_samples "
                "(e.g. 10000) or drop cache", param="num_samples",
            )
        self.sample_prompts = [str(p) for p in self.sample_prompts]
        self.lora_targets = [str(t) for t in self.lora_targets]
        if (self.mode == "lora" or self.lcf_adapter) and not self.lora_targets:
            raise InvalidInputError("lora_targets: give at least one module name", param="lora_targets")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_specs(cls):
        """(name, default, metadata) of each field, for the generated command line."""
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            yield f.name, default, dict(f.metadata)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError.out_of_range(name, value, f"an integer >= {minimum}")


def check_skipping_step(k: int, num_train_timesteps: int) -> None:
    """k must split the teacher's schedule into whole skipping steps (Luo et al. 2023, sec. 4.3)."""
    if num_train_timesteps % k:
        divisors = [d for d in (1, 2, 5, 10, 20, 25, 40, 50, 100) if num_train_timesteps % d == 0]
        raise InvalidInputError(
            f"skipping_step must divide the teacher's schedule of {num_train_timesteps} timesteps; got {k} "
            f"(e.g. {', '.join(map(str, divisors))})", param="skipping_step",
        )


def add_arguments(parser) -> None:
    """``lcmserve distill`` flags, one per DistillConfig field, generated from the fields' help."""
    import argparse

    for name, default, meta in DistillConfig.field_specs():
        help_text = meta.get("help", "")
        if meta.get("positional"):
            parser.add_argument(name, choices=meta.get("choices"), help=help_text)
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "help": help_text}
        if isinstance(default, bool):
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, list):
            kwargs.update(nargs="+", default=list(default), metavar=name.upper())
        else:
            kwargs.update(type=type(default), default=default)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("required"):
                kwargs.update(required=True, default=None)
            elif default not in ("", None):
                kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(flag, **kwargs)


def from_args(args) -> DistillConfig:
    return DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
