"""The exceptions of the vision-serving client.

Every error the client raises on purpose is a :class:`VisionClientError`. An
error the server answered is mapped from its gRPC status code in one place,
:func:`error_from_rpc`, and raised ``from`` the :class:`grpc.RpcError`, so the
original status stays reachable as ``__cause__``. ``str(error)`` (and
``error.message``) is the server's message; ``error.code`` is the
:class:`grpc.StatusCode`.

Over HTTP (a client made with an ``http://`` or ``https://`` URL) a failed call is first
turned into the gRPC status it stands for: :class:`HttpStatusError`, a ``grpc.RpcError``
made by :func:`http_error` from the HTTP status (:data:`HTTP_CODES`, the inverse of the
server's mapping) and the ``{"error": message}`` body, or from a failure to connect or a
timeout. So one mapping, one retry policy and one exception tree serve both bindings, and
``__cause__`` is an ``HttpStatusError`` whose ``http_status`` is the HTTP status (None when
no answer came).

    VisionClientError                 any other status (INTERNAL, UNKNOWN, ...)
    ├── InvalidInputError             INVALID_ARGUMENT   fix the request (image, top_k, ...)
    ├── ModelNotFoundError            NOT_FOUND          no model (or fine-tuning job) by that name
    ├── AlreadyExistsError            ALREADY_EXISTS     a fine-tuned model (or a running job) has
    │                                                    that output_model name; pass replace=True
    ├── AuthenticationError           UNAUTHENTICATED, PERMISSION_DENIED  missing or wrong token
    ├── ResourceExhaustedError        RESOURCE_EXHAUSTED the model's queue is full, or a message
    │                                                    is larger than a side accepts
    ├── UnavailableError              UNAVAILABLE        unreachable, loading or draining; retried
    ├── DeadlineExceededError         DEADLINE_EXCEEDED  the call's timeout expired
    └── FailedPreconditionError       FAILED_PRECONDITION  the server is not set up for the call
        │                                                    (fine-tuning switched off)
        └── ClientClosedError                                the client was used after close()

``ResourceExhaustedError`` is not an ``UnavailableError``: a full queue clears
up, but an oversized message never does, so it is not retried by default (add
``grpc.StatusCode.RESOURCE_EXHAUSTED`` to ``Retry.codes`` to retry it).
Errors the client detects itself (an image it cannot encode, a closed client)
carry the status code the server would have used and have no ``__cause__``.
"""

from __future__ import annotations

import json
from typing import ClassVar

import grpc

__all__ = [
    "HTTP_CODES",
    "AlreadyExistsError",
    "AuthenticationError",
    "ClientClosedError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "HttpStatusError",
    "InvalidInputError",
    "ModelNotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "VisionClientError",
    "error_from_rpc",
    "http_error",
]


class VisionClientError(Exception):
    """Base of every error the client raises; ``code`` is the gRPC status code."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


class InvalidInputError(VisionClientError):
    """The request is malformed: an image that cannot be decoded, a bad argument."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFoundError(VisionClientError):
    """The server serves no model by that name (``models()`` lists those it does), or has no such job."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(VisionClientError):
    """The name is taken: a fine-tuned model or a running job already has that ``output_model``."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class AuthenticationError(VisionClientError):
    """The call needs a token (``token=``), or the token given is not accepted."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(VisionClientError):
    """The model's queue is full, or a message is larger than the server accepts."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(VisionClientError):
    """The server cannot be reached, is still loading, or is draining; retried first."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(VisionClientError):
    """The call did not finish within its timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPreconditionError(VisionClientError):
    """The server (or the client) is not in a state to make this call, e.g. fine-tuning is switched off."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ClientClosedError(FailedPreconditionError, RuntimeError):
    """The client was used after ``close()`` (or after its ``with`` block)."""


_BY_CODE: dict[grpc.StatusCode, type[VisionClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def status_of(error: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call (UNKNOWN when the error does not say)."""
    code = getattr(error, "code", None)
    status = code() if callable(code) else None
    return status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def error_from_rpc(error: grpc.RpcError) -> VisionClientError:
    """The client error for a failed gRPC call; raise it ``from error``."""
    code = status_of(error)
    details = getattr(error, "details", None)
    message = (details() if callable(details) else None) or f"the call failed with {code.name} and no message"
    return _BY_CODE.get(code, VisionClientError)(message, code=code)


HTTP_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,  # the body did not arrive in time
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # the body is over the server's limit
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,  # a proxy found no server behind it
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""The gRPC status each HTTP status of the server stands for: the inverse of the server's
mapping (Google's, which KServe and Triton follow). Where two codes share a status (400:
INVALID_ARGUMENT and FAILED_PRECONDITION; 409: ALREADY_EXISTS and ABORTED) an answer's
``"code"`` field, when the server sends one, names the exact code."""


class HttpStatusError(grpc.RpcError):
    """A failed HTTP call as the gRPC status it stands for: ``code()`` and ``details()`` as a
    ``grpc.RpcError`` has them, and ``http_status`` (None when no answer came)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self._code = code
        self._message = message
        self.http_status = http_status

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def __str__(self) -> str:
        status = "" if self.http_status is None else f"HTTP {self.http_status}, "
        return f"{status}{self._code.name}: {self._message}"


def http_error(status: int, body: bytes, url: str) -> HttpStatusError:
    """The error of an HTTP answer that is not the call's response: the server's
    ``{"error": message}`` (and ``"code"``, if it names one), or what came instead."""
    code = HTTP_CODES.get(status, grpc.StatusCode.UNKNOWN)
    message = ""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        message = data["error"]
        named = data.get("code")
        if isinstance(named, str) and named in grpc.StatusCode.__members__ and named != "OK":
            code = grpc.StatusCode[named]
    if not message:
        text = body[:200].decode("utf-8", "replace").strip()
        message = f"HTTP {status} from {url}" + (f": {text}" if text else "")
        if status == 404:  # no such route: not our server, or not its HTTP port
            code = grpc.StatusCode.UNIMPLEMENTED
            message += "; is this the HTTP port of vision-serving (--http-port, 8000 by default)?"
    return HttpStatusError(code, message, status)
