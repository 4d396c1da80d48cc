"""The error taxonomy mapped once: lcmserve errors -> HTTP status, headers and JSON body, and gRPC codes."""

from __future__ import annotations

from typing import Any

from lcmserve.errors import (
    AuthError,
    BodyTooLargeError,
    ConflictError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    LCMServeError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)

class RequestTimeoutError(InvalidInputError):
    """The HTTP client did not send its request within read_timeout_s; it is answered 408 and disconnected."""

    type = "request_timeout"


# (HTTP status, gRPC status code name) per error class; the first match in list order wins,
# so a subclass sits above its parent. gRPC has no body size of its own to refuse (its
# message size limit answers RESOURCE_EXHAUSTED before the servicer runs).
_MAPPING: list[tuple[type[LCMServeError], int, str]] = [
    (BodyTooLargeError, 413, "INVALID_ARGUMENT"),
    (RequestTimeoutError, 408, "DEADLINE_EXCEEDED"),  # HTTP only: gRPC has no read deadline of its own
    (InvalidInputError, 422, "INVALID_ARGUMENT"),
    (AuthError, 401, "UNAUTHENTICATED"),
    (NotFoundError, 404, "NOT_FOUND"),
    (ConflictError, 409, "ALREADY_EXISTS"),
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


def error_headers(error: LCMServeError) -> dict[str, str]:
    """HTTP headers an error carries: Retry-After on 429, the auth scheme on 401 (RFC 9110, 11.6.1).

    gRPC sends the same pairs, lower-cased, as trailing metadata.
    """
    headers = retry_after_header(error)
    if isinstance(error, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    return headers
