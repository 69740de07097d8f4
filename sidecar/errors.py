"""The one error table: domain errors and the only place they are mapped to gRPC and HTTP status codes.

Front ends raise or catch `RerankError` subclasses and call `grpc_status` / `http_status`; nothing else
decides a status code. Unexpected exceptions become INTERNAL / 500 with a generic message; the
traceback goes to the log, never into the response.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class RerankError(Exception):
    """Base of every error a client may see. `message` says what to change."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(RerankError):
    code = "invalid_argument"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class Overloaded(RerankError):
    code = "overloaded"


class NotReady(RerankError):
    code = "unavailable"


class DeadlineExceeded(RerankError):
    code = "deadline_exceeded"


class Cancelled(RerankError):
    code = "cancelled"


class InternalError(RerankError):
    code = "internal"


@dataclass(frozen=True)
class Status:
    grpc: grpc.StatusCode
    http: int


_TABLE: dict[type[RerankError], Status] = {
    PayloadTooLarge: Status(grpc.StatusCode.INVALID_ARGUMENT, 413),
    InvalidInput: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    Overloaded: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    NotReady: Status(grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Cancelled: Status(grpc.StatusCode.CANCELLED, 499),
    InternalError: Status(grpc.StatusCode.INTERNAL, 500),
}


# --- HTTP/JSON front end (added by the OpenSearch integration) ---------------------------------
class InvalidSchema(InvalidInput):
    """Well-formed JSON with a missing field or a field of the wrong type (HTTP 422). gRPC never raises
    it: protobuf decoding already enforces the schema."""


_TABLE[InvalidSchema] = Status(grpc.StatusCode.INVALID_ARGUMENT, 422)


class UnsupportedMediaType(InvalidInput):
    """An HTTP POST whose Content-Type is not JSON (HTTP 415): refusing it keeps browsers' simple
    cross-site requests (text/plain, forms) away from a loopback sidecar."""

    code = "unsupported_media_type"


class SlowBody(InvalidInput):
    """An HTTP body that did not arrive within http_body_timeout_s (HTTP 408)."""

    code = "request_timeout"


_TABLE[UnsupportedMediaType] = Status(grpc.StatusCode.INVALID_ARGUMENT, 415)
_TABLE[SlowBody] = Status(grpc.StatusCode.INVALID_ARGUMENT, 408)


class Unauthenticated(RerankError):
    """A call without the bearer token the server requires (auth_token), or with another one."""

    code = "unauthenticated"

    @classmethod
    def for_header(cls, header: str | None) -> Unauthenticated:
        if header is None:
            return cls(
                "this sidecar requires a bearer token: send `authorization: Bearer TOKEN` (the operator "
                "sets it with RERANK_AUTH_TOKEN; the CLI and client take --token)"
            )
        return cls("the bearer token is wrong: send the one the sidecar was started with (RERANK_AUTH_TOKEN)")


_TABLE[Unauthenticated] = Status(grpc.StatusCode.UNAUTHENTICATED, 401)
# -----------------------------------------------------------------------------------------------

GENERIC_INTERNAL_MESSAGE = "internal error; the sidecar logged the details"


def status_of(error: BaseException) -> Status:
    for cls in type(error).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]  # type: ignore[index]
    return _TABLE[InternalError]


def public_message(error: BaseException) -> str:
    """What a client may read: our own messages, never the text of an unexpected exception."""
    if isinstance(error, RerankError) and not isinstance(error, InternalError):
        return error.message
    return GENERIC_INTERNAL_MESSAGE


def json_type_name(value: object) -> str:
    """The JSON name of a decoded value's type, for messages about a field of the wrong type."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def outcome_label(error: BaseException | None) -> str:
    """The `outcome` label of the requests counter."""
    if error is None:
        return "ok"
    return error.code if isinstance(error, RerankError) else "internal"
