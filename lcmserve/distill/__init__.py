"""Latent consistency distillation (LCD), LCM-LoRA and latent consistency fine-tuning (LCF)."""

from lcmserve.distill.config import DistillConfig
from lcmserve.distill.train import DistillResult, check_inputs, distill

__all__ = ["DistillConfig", "DistillResult", "check_inputs", "distill"]
