"""Engine backends: one contract (``Backend.run``), one file per backend."""

from lcmserve.engine.backends.base import Backend, BackendOutput, Bucket, DenoiseBatch, StageTimes
from lcmserve.engine.backends.torch_backend import TorchBackend

__all__ = ["Backend", "BackendOutput", "Bucket", "DenoiseBatch", "StageTimes", "TorchBackend"]
