"""The one exception tree of the server.

Every error the core raises on purpose is a :class:`VisionServeError`. Each
class names, in ``status``, the canonical gRPC status code it stands for; the
transport maps it in one place (``service.transport.errors``). The core never
imports gRPC.

    VisionServeError
    ├── InvalidInputError        INVALID_ARGUMENT   a request the client must fix
    │   └── BuiltinModelError                       a built-in model's name where a fine-tuned one is meant
    ├── ModelNotFoundError       NOT_FOUND          no model (or job) by that name
    ├── RegionNotFoundError      NOT_FOUND          no shared memory region by that name
    ├── AlreadyExistsError       ALREADY_EXISTS     a name that is taken
    ├── ConflictError            ABORTED            a concurrent writer won (retry)
    ├── QueueFullError           RESOURCE_EXHAUSTED the model's queue is full
    ├── SharedMemoryFullError    RESOURCE_EXHAUSTED the shared memory regions' caps are reached
    ├── DeadlineExceededError    DEADLINE_EXCEEDED  expired before compute
    ├── UnavailableError         UNAVAILABLE        not ready yet, or draining
    │   ├── QueueClosedError                        the model was replaced or stopped
    │   └── StoreEntryError                         a model store entry that cannot be served
    ├── AuthenticationError      UNAUTHENTICATED    missing or wrong token
    ├── PermissionDeniedError    PERMISSION_DENIED  a caller this server does not let in
    ├── FailedPreconditionError  FAILED_PRECONDITION
    │   └── WeightsUnavailableError                 weights cannot be loaded
    ├── InternalError            INTERNAL           a bug or a device failure
    └── StoreWriteError          RESOURCE_EXHAUSTED the model store is full (UNAVAILABLE: unwritable)
"""

from __future__ import annotations

import errno
from typing import ClassVar

QUOTE_CHARS = 80  # of a caller's name, version, id or value repeated in a message or a log line


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``value`` quoted for a message or a log line, cut to ``limit`` characters.

    Whatever a caller sends (a model name, a version, a job id, a parameter) is quoted through
    this, never repeated whole: a 10 KB name would otherwise make the status trailer exceed a
    client's metadata limit (which then reports RESOURCE_EXHAUSTED instead of the real error) and
    fill the log.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class VisionServeError(Exception):
    """Base of every error the server raises deliberately."""

    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(VisionServeError):
    status = "INVALID_ARGUMENT"


class BuiltinModelError(InvalidInputError):
    """A built-in model named where only a fine-tuned one may be (output, deletion, store entry)."""

    def __init__(self, name: str, action: str) -> None:
        super().__init__(f"{name!r} is a built-in model and cannot be {action}; use another name")
        self.name = name


class ModelNotFoundError(VisionServeError):
    status = "NOT_FOUND"


class RegionNotFoundError(VisionServeError):
    """No system shared memory region is registered under the name a call gives."""

    status = "NOT_FOUND"


class AlreadyExistsError(VisionServeError):
    status = "ALREADY_EXISTS"


class ConflictError(VisionServeError):
    """Another writer changed what this one was about to replace (a model in a shared store)."""

    status = "ABORTED"


class QueueFullError(VisionServeError):
    status = "RESOURCE_EXHAUSTED"


class SharedMemoryFullError(VisionServeError):
    """A registration over the caps on the number or total size of shared memory regions."""

    status = "RESOURCE_EXHAUSTED"


class SlotsFullError(QueueFullError):
    """A protocol front end's shared memory for requests in flight to the engine is full
    (``service.inference.hop``): answered as a full queue is."""


class DeadlineExceededError(VisionServeError):
    status = "DEADLINE_EXCEEDED"


class UnavailableError(VisionServeError):
    status = "UNAVAILABLE"


class QueueClosedError(UnavailableError):
    """The model's queue takes no more work: it was replaced, deleted or is stopping."""


class StoreEntryError(UnavailableError):
    """A model store entry that cannot be served now: ``reason`` (a ``StoreReason`` of
    ``service.finetune.store``) labels ``vision_store_errors_total``; the message is for the log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationError(VisionServeError):
    status = "UNAUTHENTICATED"


class PermissionDeniedError(VisionServeError):
    """The caller may not make this call whatever it sends: a management call from a
    non-loopback peer to a server that has no token file."""

    status = "PERMISSION_DENIED"


class FailedPreconditionError(VisionServeError):
    status = "FAILED_PRECONDITION"


class WeightsUnavailableError(FailedPreconditionError):
    """Pretrained weights could not be downloaded or read."""


class InternalError(VisionServeError):
    status = "INTERNAL"


class StoreWriteError(VisionServeError):
    """The model store could not be written: RESOURCE_EXHAUSTED when it is full (gRPC's code for
    an exhausted file system), UNAVAILABLE otherwise."""

    def __init__(self, root: object, cause: OSError) -> None:
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        super().__init__(
            f"cannot write the model store {root}: {cause.strerror or cause}; "
            + ("free space there and run the job again" if full else "check the store and run the job again")
        )
        self.status = "RESOURCE_EXHAUSTED" if full else "UNAVAILABLE"  # type: ignore[misc]


class RelayedError(VisionServeError):
    """An error another process of this server answered (the engine, to a protocol front end),
    relayed with its gRPC status code's name and message unchanged."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]
