"""The one error taxonomy of lcmserve.

Every failure a caller can see is one of these classes. Its ``type`` string is the same in
HTTP bodies, gRPC details and the failure metric's label; the server maps each class once
(invalid input -> 422 / INVALID_ARGUMENT, body too large -> 413, missing or wrong API key ->
401 / UNAUTHENTICATED, not found -> 404 / NOT_FOUND, conflict -> 409 / ALREADY_EXISTS, overloaded -> 429 / RESOURCE_EXHAUSTED, deadline -> 504 /
DEADLINE_EXCEEDED, draining -> 503 / UNAVAILABLE, engine fault -> 500 / INTERNAL).
"""

from __future__ import annotations

import math
from typing import Any


class LCMServeError(Exception):
    """Base class; ``type`` labels the failure in responses and metrics."""

    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "param": self.param}


class InvalidInputError(LCMServeError, ValueError):
    """A value the caller sent is out of range or of the wrong kind."""

    type = "invalid_request"

    @classmethod
    def out_of_range(cls, param: str, value: Any, allowed: str) -> "InvalidInputError":
        return cls(f"{param} must be {allowed}; got {value!r}", param=param)


class ModelLoadError(InvalidInputError):
    """The model the caller named cannot be loaded as an LCM (missing, not diffusers, not an LCM)."""

    type = "invalid_model"


class BodyTooLargeError(InvalidInputError):
    """Invalid input refused before it is read, because of its size (HTTP 413)."""


class AuthError(LCMServeError):
    """The API key is missing or wrong; ``param`` names where it is sent (header or metadata)."""

    type = "unauthorized"


class NotFoundError(LCMServeError):
    """The caller named something this server does not hold (an adapter that is not loaded).

    Not an InvalidInputError: the value is well formed, the thing it names is absent (404, not 422)."""

    type = "not_found"


class ConflictError(LCMServeError):
    """The caller asked to create something that exists already (an adapter name that is loaded)."""

    type = "conflict"


class OverloadedError(LCMServeError):
    """The queue is full; retry after ``retry_after_s``."""

    type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(LCMServeError):
    """The request's deadline passed before its images were ready."""

    type = "deadline_exceeded"


class UnavailableError(LCMServeError):
    """The server is starting up or draining and takes no new work."""

    type = "unavailable"


class EngineError(LCMServeError):
    """The engine failed while running a batch; only that batch's requests fail."""

    type = "internal_error"


# -- range checks shared by every typed config (engine, server, distill) ------------------------
def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (no upper bound when ``high`` is None), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise InvalidInputError.out_of_range(name, value, allowed)
    return value


def check_float(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    """``value`` as a finite number in [low, high] (or (low, high] with ``open_low``), else a clear error."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not (low < value if open_low else low <= value) or value > high:
        upper = "" if math.isinf(high) else f", {high}]"
        allowed = (f"a number in {'(' if open_low else '['}{low}{upper}" if upper
                   else f"a finite number {'>' if open_low else '>='} {low}")
        raise InvalidInputError.out_of_range(name, value, allowed)
    return float(value)
