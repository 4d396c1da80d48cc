"""Model loading: diffusers folders, Hub ids, LCM-LoRA, random-weight presets."""

from lcmserve.models.loading import load_model, load_preview_decoder, load_vae, resolve_device_dtype
from lcmserve.models.model import LCMModel, NoiseSchedule

# The shapes LCM, distilled by this project's own code and shipped in the package.
DEFAULT_MODEL = "shapes-lcm"

__all__ = ["DEFAULT_MODEL", "LCMModel", "NoiseSchedule", "load_model", "load_preview_decoder", "load_vae",
           "resolve_device_dtype"]
