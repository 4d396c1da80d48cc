"""The engine: LCM sampling in 1-8 steps over batches of rows, behind one backend contract."""

from lcmserve.engine.request import GenerationRequest, Limits, Row
from lcmserve.engine.sampler import BatchResult, GenerationResult, LCMSampler

__all__ = ["BatchResult", "GenerationRequest", "GenerationResult", "LCMSampler", "Limits", "Row"]
