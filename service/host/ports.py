"""The ports a server is about to listen on, checked before anything is loaded.

A port that another process holds would otherwise be found only when the server binds it; this
checks every one of them first (gRPC, HTTP, metrics, the health-only port) and names each one that
cannot be had, with the option that moves it, in one message. Port 0 (any free port, as tests
bind) needs no check.

The check binds a socket the way the servers do (``SO_REUSEADDR``, no ``SO_REUSEPORT``) and closes
it at once; a port taken between the check and the server's own bind is still refused there, by
:func:`bind_error`.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.errors import FailedPreconditionError

if TYPE_CHECKING:
    from service.config import ServeConfig


@dataclass(frozen=True)
class Listener:
    """One port the server listens on, and the option that sets it."""

    option: str  # "--grpc-port"
    host: str
    port: int

    def describe(self) -> str:
        return f"{self.option} {self.port} (on {self.host or '0.0.0.0'})"


def check_ports(listeners: list[Listener]) -> None:
    """Raise :class:`FailedPreconditionError` naming every listener that cannot bind (port 0 skipped)."""
    problems: list[str] = []
    claimed: dict[int, str] = {}
    for listener in listeners:
        if listener.port == 0:
            continue
        other = claimed.get(listener.port)
        if other is not None:
            problems.append(f"{listener.option} {listener.port} is also {other}'s port")
            continue
        claimed[listener.port] = listener.option
        reason = _bind_problem(listener.host, listener.port)
        if reason is not None:
            problems.append(f"{listener.describe()} {reason}")
    if problems:
        raise FailedPreconditionError(
            "cannot listen: "
            + "; ".join(problems)
            + ". Stop what holds the port or choose others with the options named "
            "(or their VISION_SERVE_* variables; 0 picks a free port)"
        )


def bind_error(listener: Listener, exc: BaseException) -> FailedPreconditionError:
    """The one-line error for a bind that failed in the server itself (after :func:`check_ports`)."""
    reason = _reason(exc.errno) if isinstance(exc, OSError) else None
    return FailedPreconditionError(
        f"cannot listen: {listener.describe()} {reason or f'could not be bound ({exc})'}; "
        f"stop what holds it or choose another port with {listener.option}"
    )


def _bind_problem(host: str, port: int) -> str | None:
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"has an address that does not resolve ({exc.strerror})"
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:  # no IPv6 on this host: the server skips it too
                continue
            return _reason(exc.errno) or f"could not be bound ({exc.strerror})"
    return None


def _reason(code: int | None) -> str | None:
    if code == errno.EADDRINUSE:
        return "is in use by another process"
    if code == errno.EACCES:
        return "needs privileges (ports below 1024 do)"
    if code == errno.EADDRNOTAVAIL:
        return "is on an address that is not this host's"
    return None


def bracketed(host: str) -> str:
    """``host`` as it goes before ``:port`` in an address: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def listeners(config: ServeConfig) -> list[Listener]:
    """Every port ``config`` listens on, with the option that sets it."""
    found = [Listener("--grpc-port", config.host, config.grpc_port)]
    if config.http_port is not None:
        found.append(Listener("--http-port", config.host, config.http_port))
    found.append(Listener("--metrics-port", config.metrics_host or config.host, config.metrics_port))
    if config.health_port is not None:
        found.append(Listener("--health-port", config.host, config.health_port))
    return found
