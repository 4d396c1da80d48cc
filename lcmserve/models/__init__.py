"""Model loading: diffusers folders, Hub ids, LCM-LoRA, random-weight presets."""

from lcmserve.models.loading import load_model, load_preview_decoder, load_vae, resolve_device, resolve_device_dtype
from lcmserve.models.model import LCMModel, NoiseSchedule

# The bundled shapes LCM, distilled by this project's own code; its name reaches load_model through
# the registry (lcmserve.models.registry), which the shapes package fills.
DEFAULT_MODEL = "shapes-lcm"

__all__ = ["DEFAULT_MODEL", "LCMModel", "NoiseSchedule", "load_model", "load_preview_decoder", "load_vae",
           "resolve_device", "resolve_device_dtype"]
