"""Retries with exponential backoff and jitter, and each call's deadline: pure bookkeeping.

The clients ask an :class:`Attempts` what to do after each failed attempt; it
answers how long to sleep, or raises the mapped error. Sleeping and sending are
the clients' business (``time.sleep`` or ``asyncio.sleep``).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from vision_client.errors import error_from_rpc, status_of

log = logging.getLogger("vision_client")


@dataclass(frozen=True)
class Retry:
    """How failed idempotent calls are retried.

    ``attempts`` retries follow the first try (``Retry(0)`` never retries). The
    n-th retry waits ``min(max_backoff, backoff * 2**(n-1))`` seconds, shortened
    by up to ``jitter`` (a fraction) at random so that many clients do not retry
    in step. Only calls that are safe to repeat are retried, and never past the
    call's deadline. Each retry is logged at INFO on the ``vision_client`` logger.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    jitter: float = 0.5
    codes: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"Retry.attempts must be 0 or more, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("Retry.backoff and Retry.max_backoff must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Retry.jitter must be between 0 and 1, got {self.jitter}")

    @classmethod
    def of(cls, retries: int | Retry | None) -> Retry:
        """``retries`` as a policy: an int is the number of retries, None is none."""
        if retries is None:
            return cls(attempts=0)
        if isinstance(retries, Retry):
            return retries
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int or a Retry, got {type(retries).__name__}")
        return cls(attempts=retries)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (retry - 1))
        return ceiling * (1.0 - self.jitter * random.random())

    def should_retry(self, code: grpc.StatusCode, *, idempotent: bool) -> bool:
        return idempotent and code in self.codes


class Attempts:
    """The attempts of one RPC: its deadline and whether to try again after a failure."""

    def __init__(self, policy: Retry, method: str, *, idempotent: bool, timeout: float | None) -> None:
        self._policy = policy
        self._method = method
        self._idempotent = idempotent
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.retries = 0

    def timeout(self) -> float | None:
        """Seconds left for the next attempt (None: no deadline)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def backoff(self, error: grpc.RpcError) -> float:
        """Seconds to sleep before trying again; raises the client error if there is no retry."""
        code = status_of(error)
        delay = self._policy.delay(self.retries + 1)
        left = self.timeout()
        if (
            self.retries >= self._policy.attempts
            or not self._policy.should_retry(code, idempotent=self._idempotent)
            or (left is not None and delay >= left)
        ):
            raise error_from_rpc(error) from error
        self.retries += 1
        log.info(
            "retry %d of %d of %s in %.3fs after %s: %s",
            self.retries,
            self._policy.attempts,
            self._method,
            delay,
            code.name,
            error_from_rpc(error).message,
        )
        return delay
