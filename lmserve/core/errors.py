"""Neutral error vocabulary. Dialects map ErrorKind to their own status codes and bodies."""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    UNSUPPORTED = "unsupported"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"  # a valid key that may not do this (an admin route)
    PAYLOAD_TOO_LARGE = "payload_too_large"  # the body is over --max-body-bytes
    RATE_LIMITED = "rate_limited"  # the caller's key is over its requests or tokens a minute
    OVERLOADED = "overloaded"
    LOADING = "loading"
    CAPACITY = "capacity"  # the engine ran out of room (KV cache) for a running request
    DRAINING = "draining"  # the server is shutting down: no new work; running work was cut
    UNAVAILABLE = "unavailable"  # a service a request needs (the store) cannot be reached
    UPSTREAM = "upstream"  # an upstream server refused the connection or answered badly
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERNAL = "internal"

    @property
    def http_status(self) -> int:
        return _STATUS[self]


_STATUS = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.MODEL_NOT_FOUND: 404,
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorKind.UNSUPPORTED: 400,
    ErrorKind.AUTHENTICATION: 401,
    ErrorKind.PERMISSION: 403,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.LOADING: 503,
    ErrorKind.CAPACITY: 503,
    ErrorKind.DRAINING: 503,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.UPSTREAM: 502,
    ErrorKind.UPSTREAM_TIMEOUT: 504,
    ErrorKind.INTERNAL: 500,
}


class LmserveError(Exception):
    """An error with a kind, a message and, where it applies, the offending parameter."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"LmserveError({self.kind.value}, {self.message!r}, param={self.param!r})"


def invalid(message: str, param: str | None = None, code: str | None = None) -> LmserveError:
    return LmserveError(ErrorKind.INVALID_REQUEST, message, param=param, code=code)


def unsupported(param: str, detail: str = "") -> LmserveError:
    message = f"'{param}' is not supported yet by this server" + (f": {detail}" if detail else "")
    return LmserveError(ErrorKind.UNSUPPORTED, message, param=param, code="unsupported_parameter")


def draining_error() -> LmserveError:
    """The refusal of new work while the server shuts down (503 with Retry-After)."""
    return LmserveError(ErrorKind.DRAINING, "the server is shutting down and takes no new "
                        "requests; retry on another replica or after the restart",
                        code="server_draining", retry_after=5.0)
