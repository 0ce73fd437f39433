"""The exceptions of the vision-serving client.

Every error the client raises on purpose is a :class:`VisionClientError`. An
error the server answered is mapped from its gRPC status code in one place,
:func:`error_from_rpc`, and raised ``from`` the :class:`grpc.RpcError`, so the
original status stays reachable as ``__cause__``. ``str(error)`` (and
``error.message``) is the server's message; ``error.code`` is the
:class:`grpc.StatusCode`.

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

from typing import ClassVar

import grpc

__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "ClientClosedError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidInputError",
    "ModelNotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "VisionClientError",
    "error_from_rpc",
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
