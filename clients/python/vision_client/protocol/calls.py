"""Awaiting a grpc.aio client-streaming call, for the SDK and for the front ends that relay one.

When the server ends such a call while the client is still writing (it refused the upload from
its first message), a write fails in Core, and grpc.aio (1.81 included; grpc/grpc#36066) then
sets the call's status to a synthetic ``INTERNAL: Internal error from Core``, over the server's
own when that came first: a refused job would read as an internal error in about one upload of
large images in six. :func:`finish_upload` raises the server's status instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import grpc.aio

T = TypeVar("T")


async def finish_upload(call: Awaitable[T]) -> T:
    """``await call``; where a failed write replaced the server's status, raise the server's.

    ``call`` may be any awaitable (the SDK's HTTP uploads are tasks): only a grpc.aio call is watched.
    """
    statuses = _Statuses.of(call)
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        sent = statuses.instead_of(error) if statuses is not None else None
        if sent is None:
            raise
        raise sent from None


class _Statuses:
    """Every status a grpc.aio call takes, kept as it is set: each passes through its done callbacks."""

    def __init__(self) -> None:
        self.seen: list[grpc.aio.AioRpcError] = []

    @classmethod
    def of(cls, call: object) -> _Statuses | None:
        """Watch ``call`` if it is a grpc.aio call (the HTTP channel's uploads are tasks)."""
        if not isinstance(call, grpc.aio.Call):
            return None
        statuses = cls()
        call.add_done_callback(statuses._record)
        return statuses

    def _record(self, call: Any) -> None:  # a grpc.aio call (its type omits debug_error_string)
        # The call has its status now: these coroutines return without waiting. (Nothing may
        # escape: this runs inside grpc.aio as it sets the status.)
        with contextlib.suppress(RuntimeError):
            self.seen.append(
                grpc.aio.AioRpcError(
                    _finished(call.code()),
                    _finished(call.initial_metadata()),
                    _finished(call.trailing_metadata()),
                    _finished(call.details()),
                    _finished(call.debug_error_string()),
                )
            )

    def instead_of(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError | None:
        """The server's status where ``error`` is the synthetic one a failed write set; else None."""
        if not _failed_write(error):
            return None
        return next((status for status in self.seen if not _failed_write(status)), None)


def _failed_write(error: grpc.aio.AioRpcError) -> bool:
    return (
        error.code() is grpc.StatusCode.INTERNAL
        and error.details() == "Internal error from Core"
        and "SendMessageOperation" in (error.debug_error_string() or "")
    )


def _finished(step: Any) -> Any:
    """The value of a coroutine that completes without suspending (it reads a finished call)."""
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    step.close()
    raise RuntimeError("the call has not finished")
