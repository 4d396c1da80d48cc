"""Model loading: diffusers folders, Hub ids, LCM-LoRA, random-weight presets."""

from lcmserve.models.loading import load_model, resolve_device_dtype
from lcmserve.models.model import LCMModel, NoiseSchedule

# Random weights until the shapes family ships a trained model.
DEFAULT_MODEL = "preset:tiny-sd"

__all__ = ["DEFAULT_MODEL", "LCMModel", "NoiseSchedule", "load_model", "resolve_device_dtype"]
