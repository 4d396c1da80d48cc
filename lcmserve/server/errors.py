"""The error taxonomy mapped once: lcmserve errors -> HTTP status + JSON body, and gRPC codes."""

from __future__ import annotations

from typing import Any

from lcmserve.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    LCMServeError,
    OverloadedError,
    UnavailableError,
)

# (HTTP status, gRPC status code name) per error class; the first match in MRO order wins.
_MAPPING: list[tuple[type[LCMServeError], int, str]] = [
    (InvalidInputError, 422, "INVALID_ARGUMENT"),
    (OverloadedError, 429, "RESOURCE_EXHAUSTED"),
    (DeadlineExceededError, 504, "DEADLINE_EXCEEDED"),
    (UnavailableError, 503, "UNAVAILABLE"),
    (EngineError, 500, "INTERNAL"),
]


def classify(error: BaseException) -> LCMServeError:
    """Any exception as an LCMServeError; unknown ones become an engine fault (500 / INTERNAL)."""
    if isinstance(error, LCMServeError):
        return error
    return EngineError(f"internal error: {type(error).__name__}")


def http_status(error: LCMServeError) -> int:
    for cls, status, _ in _MAPPING:
        if isinstance(error, cls):
            return status
    return 500


def grpc_code_name(error: LCMServeError) -> str:
    for cls, _, code in _MAPPING:
        if isinstance(error, cls):
            return code
    return "INTERNAL"


def error_body(error: LCMServeError) -> dict[str, Any]:
    """The JSON body of every error response: {"error": {"type", "message", "param"}}."""
    return {"error": error.to_dict()}


def retry_after_header(error: LCMServeError) -> dict[str, str]:
    if isinstance(error, OverloadedError):
        return {"Retry-After": str(max(1, round(error.retry_after_s)))}
    return {}
