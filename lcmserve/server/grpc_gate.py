"""What a gRPC call meets before its message is read: the API key, the size limit, and a decoder whose errors name a field.

grpcio hands a server interceptor the call's method and metadata before the request message
arrives. ``CallGate`` uses that moment twice:

1. a call that needs the key and lacks it gets a handler that never reads the message and
   ends the call UNAUTHENTICATED (the message's bytes are discarded by the transport, not
   parsed or held);
2. every other call gets its handler back with a decoder that turns a message protobuf cannot
   parse (a string field whose bytes are not UTF-8) into INVALID_ARGUMENT naming the field,
   where grpcio would answer INTERNAL.

The size of one message is bounded by grpcio itself (``grpc_max_message_bytes``, applied as
``grpc.max_receive_message_length``): a larger one is refused RESOURCE_EXHAUSTED unparsed.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from lcmserve.errors import AuthError, InvalidInputError, LCMServeError
from lcmserve.server.errors import error_headers, grpc_code_name

logger = logging.getLogger(__name__)
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def abort(context: grpc.ServicerContext, error: LCMServeError) -> NoReturn:
    """End the call with the error's status code; type, param and retry-after go in trailing metadata."""
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    trailers = [("lcmserve-error-type", error.type)]
    if error.param:
        trailers.append(("lcmserve-error-param", error.param))
    trailers += [(k.lower(), v) for k, v in error_headers(error).items()]
    context.set_trailing_metadata(tuple(trailers))
    context.abort(getattr(grpc.StatusCode, grpc_code_name(error)), message)


def key_error(api_key: bytes | None, metadata) -> AuthError | None:
    """The UNAUTHENTICATED error of a call whose metadata lacks ``authorization: Bearer <key>`` (None: it has it)."""
    if api_key is None:
        return None
    given = ""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            given = value if isinstance(value, str) else value.decode("latin-1")
    scheme, _, token = given.strip().partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key):
        return None
    return AuthError("missing or wrong API key: send the metadata 'authorization: Bearer <key>'",
                     param="authorization")


# 1. decoding: a message protobuf refuses becomes INVALID_ARGUMENT naming its field -------------------------
class _Undecodable:
    """What the decoder hands the handler in place of a message protobuf could not parse."""

    def __init__(self, error: InvalidInputError) -> None:
        self.error = error


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _bad_text_field(descriptor, data: bytes) -> str | None:
    """The first top-level string field of ``data`` whose bytes are not UTF-8; None if none is (or it cannot tell)."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == _WIRE_VARINT:
                _, pos = _varint(data, pos)
            elif wire in (_WIRE_I64, _WIRE_I32):
                pos += 8 if wire == _WIRE_I64 else 4
            elif wire == _WIRE_LEN:
                size, pos = _varint(data, pos)
                value, pos = data[pos:pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is not None and field.type == field.TYPE_STRING:
                    value.decode("utf-8")
            else:
                return None
    except UnicodeDecodeError:
        return field.name
    except ValueError:
        return None
    return None


def _decoder(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` (a message class's FromString) whose refusals become an ``_Undecodable``."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            param = None if descriptor is None else _bad_text_field(descriptor, data)
            if param is not None:
                return _Undecodable(InvalidInputError(
                    f"{param} is not valid UTF-8 text (proto3 strings must be UTF-8; send bytes as UTF-8 text)",
                    param=param))
            return _Undecodable(InvalidInputError("the request message cannot be parsed as its proto type",
                                                  param="request"))

    return decode


def _checked(behavior: Callable) -> Callable:
    def run(request, context):
        if isinstance(request, _Undecodable):
            abort(context, request.error)
        return behavior(request, context)

    return run


# 2. the interceptor --------------------------------------------------------------------------------------
class CallGate(grpc.ServerInterceptor):
    """The key check before the message is read, then the decoder; see the module docstring.

    ``keyed`` says which methods ("/package.Service/Method") need the key; ``on_refused(method,
    error)`` counts a refused call (the servicer never sees it).
    """

    def __init__(self, api_key: str | None, keyed: Callable[[str], bool],
                 on_refused: Callable[[str, LCMServeError], None]) -> None:
        self.api_key = None if api_key is None else api_key.encode()
        self.keyed = keyed
        self.on_refused = on_refused

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:  # unknown methods, and none of ours streams requests
            return handler
        method = handler_call_details.method
        if self.keyed(method):
            error = key_error(self.api_key, handler_call_details.invocation_metadata)
            if error is not None:
                return self._refusal(handler, method, error)
        decode = _decoder(handler.request_deserializer) if handler.request_deserializer else None
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_checked(handler.unary_stream), decode,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(_checked(handler.unary_unary), decode,
                                                   handler.response_serializer)

    def _refusal(self, handler, method: str, error: LCMServeError):
        """A handler that ends the call with ``error`` without reading its message.

        It is registered as request-streaming, so grpcio does not wait for the (unary) message
        before calling it, and it never asks for one.
        """
        def refuse(_requests, context):
            self.on_refused(method, error)
            abort(context, error)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse, None, handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(refuse, None, handler.response_serializer)


__all__ = ["CallGate", "abort", "key_error"]
