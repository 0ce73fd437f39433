"""Who may call what: RPC scopes, bearer tokens, and the loopback rule.

Every RPC belongs to one scope (:data:`RPC_SCOPES`, the one table of them):

- ``open``: health checks, for probes and load balancers; never refused.
- ``inference``: ModelInfer, ModelStreamInfer, metadata, configuration, statistics,
  reflection. Needs a token only with ``--auth-scope all``.
- ``management``: FineTuning (model deletion included), RepositoryModelLoad/Unload,
  and any method the table does not know. With ``--auth-token-file`` it needs
  ``authorization: Bearer <token>``; without one it is accepted from loopback peers
  only, so that an unconfigured server reachable over a network cannot be retrained.
- ``host management``: Triton's system shared memory calls. They make the server open a
  file of this host and write into it, which only a caller on this host has a reason to
  ask: loopback peers only, always, and then the ``management`` rule (the token, if any).

Refusals are :class:`AuthenticationError` (UNAUTHENTICATED: missing or wrong token)
or :class:`PermissionDeniedError` (PERMISSION_DENIED: a non-loopback peer and no
token file), raised inside the method's handler so that the error-mapping
interceptor, outside this one, answers them.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

from service.errors import AuthenticationError, FailedPreconditionError, PermissionDeniedError
from service.files import MAX_TOKEN_FILE_BYTES, SMALL_FILE_TIMEOUT_S, FileRefused, in_daemon_thread, read_bounded
from service.transport.handlers import AioContext, HandlerInterceptor, Req, Resp, behaviors, replace, responses

log = logging.getLogger(__name__)


class Scope(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    MANAGEMENT = "management"
    HOST_MANAGEMENT = "host management"  # management, and from this host only whatever the token


_INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
_FINE_TUNING_SERVICE = "/vision.v1.FineTuning/"

RPC_SCOPES: Mapping[str, Scope] = {
    # grpc.health.v1: probes must work without credentials.
    "/grpc.health.v1.Health/Check": Scope.OPEN,
    "/grpc.health.v1.Health/Watch": Scope.OPEN,
    "/grpc.health.v1.Health/List": Scope.OPEN,
    # Open Inference Protocol (KServe v2) and Triton's extensions.
    _INFERENCE_SERVICE + "ServerLive": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ServerReady": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ModelReady": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ServerMetadata": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ModelMetadata": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ModelInfer": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ModelStreamInfer": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ModelConfig": Scope.INFERENCE,
    _INFERENCE_SERVICE + "ModelStatistics": Scope.INFERENCE,
    _INFERENCE_SERVICE + "RepositoryIndex": Scope.INFERENCE,
    _INFERENCE_SERVICE + "RepositoryModelLoad": Scope.MANAGEMENT,
    _INFERENCE_SERVICE + "RepositoryModelUnload": Scope.MANAGEMENT,
    # System shared memory names files of this host: management, and from this host only.
    _INFERENCE_SERVICE + "SystemSharedMemoryStatus": Scope.HOST_MANAGEMENT,
    _INFERENCE_SERVICE + "SystemSharedMemoryRegister": Scope.HOST_MANAGEMENT,
    _INFERENCE_SERVICE + "SystemSharedMemoryUnregister": Scope.HOST_MANAGEMENT,
    # Our own read-only model listing.
    "/vision.v1.Models/ListModels": Scope.INFERENCE,
    "/vision.v1.Models/GetModel": Scope.INFERENCE,
    "/vision.v1.Models/GetThroughput": Scope.INFERENCE,
    # Fine-tuning creates, replaces and deletes models: all of it is management.
    _FINE_TUNING_SERVICE + "CreateJob": Scope.MANAGEMENT,
    _FINE_TUNING_SERVICE + "WatchJob": Scope.MANAGEMENT,
    _FINE_TUNING_SERVICE + "GetJob": Scope.MANAGEMENT,
    _FINE_TUNING_SERVICE + "ListJobs": Scope.MANAGEMENT,
    _FINE_TUNING_SERVICE + "CancelJob": Scope.MANAGEMENT,
    _FINE_TUNING_SERVICE + "DeleteModel": Scope.MANAGEMENT,
    # Reflection describes the API (what grpcurl needs); it reveals no model or data.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Scope.INFERENCE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Scope.INFERENCE,
}


def scope_of(method: str) -> Scope:
    """The scope of a full method name; an unknown method gets the stricter ``management``."""
    return RPC_SCOPES.get(method, Scope.MANAGEMENT)


def is_loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer string (``ServicerContext.peer()``) is this host.

    Loopback is 127.0.0.0/8, ::1, IPv4-mapped forms of those (``::ffff:127.0.0.1``) and
    Unix domain sockets. gRPC percent-encodes the brackets of IPv6 peers
    (``ipv6:%5B::1%5D:5``); both forms are understood. Anything unparsable is not loopback.
    """
    scheme, _, rest = peer.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme not in ("ipv4", "ipv6") or not rest:
        return False
    address = unquote(rest)
    if address.startswith("["):
        host, bracket, _ = address[1:].partition("]")
        if not bracket:
            return False
    elif scheme == "ipv4":
        host = address.rpartition(":")[0] or address
    else:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def parse_tokens(text: str) -> tuple[str, ...]:
    """Tokens of a token file: one a line; blank lines and lines starting with ``#`` are skipped."""
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def _digest(token: bytes) -> bytes:
    # Comparing digests of equal length keeps even a token's length out of the timing.
    return hashlib.sha256(token).digest()


class TokenFile:
    """The tokens of ``--auth-token-file``, read again whenever the file changes.

    The file is checked (one ``stat``) before each protected call; a new inode, size or
    modification time makes it read again, so a token can be added, rolled out to
    clients and the old one removed without a restart (Kubernetes updates a mounted
    Secret by swapping a symlink: a new inode). A file that disappears, becomes empty or
    is no longer a regular file of sane size after start-up refuses every token (and says
    so in the log) until it is fixed.

    On the server the check runs off the event loop (:meth:`refresh`), in one daemon thread
    at a time, waited for a few seconds at most: a hung network file system delays protected
    calls by that much and stops nothing else; meanwhile the tokens read last stay in force.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # (file signature, token digests), replaced whole: the reading thread swaps it.
        self._state: tuple[tuple[int, ...] | None, tuple[bytes, ...]] = (None, ())
        self._reading: asyncio.Future[None] | None = None
        self._slow = False
        self._reload(initial=True)

    def _stat(self) -> tuple[int, ...]:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _reload(self, *, initial: bool = False) -> None:
        signature_before, _ = self._state
        try:
            signature = self._stat()
            if signature == signature_before:
                return
            # Followed if a symlink: a mounted Secret is one.
            data = read_bounded(self.path, MAX_TOKEN_FILE_BYTES, follow_symlinks=True)
            tokens = parse_tokens(data.decode("utf-8"))
        except (OSError, UnicodeDecodeError, FileRefused) as exc:
            if initial:
                raise FailedPreconditionError(f"cannot read --auth-token-file {self.path}: {exc}") from exc
            if signature_before is not None:
                log.error(
                    "cannot read --auth-token-file %s (%s): refusing every token until it is back", self.path, exc
                )
            self._state = (None, ())
            return
        if not tokens:
            message = f"--auth-token-file {self.path} holds no token; put one a line (e.g. `openssl rand -hex 32`)"
            if initial:
                raise FailedPreconditionError(message)
            log.error("%s: refusing every token until it does", message)
        for token in tokens:
            if len(token) < 16:
                log.warning(
                    "a token in %s is only %d characters long: use 32 random bytes or more", self.path, len(token)
                )
        if not initial:
            log.info("re-read %s: %d token(s)", self.path, len(tokens))
        self._state = (signature, tuple(_digest(token.encode("utf-8")) for token in tokens))

    async def refresh(self) -> None:
        """Re-read the file if it changed, off the event loop, waiting at most a few seconds."""
        if self._reading is None or self._reading.done():
            self._reading = in_daemon_thread(self._reload, "auth-token-file")
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), SMALL_FILE_TIMEOUT_S)
        except asyncio.TimeoutError:
            if not self._slow:
                log.error(
                    "--auth-token-file %s: no answer from the file system within %gs; "
                    "the tokens read last stay in force until it answers",
                    self.path,
                    SMALL_FILE_TIMEOUT_S,
                )
            self._slow = True
            return
        self._slow = False

    def accepts(self, token: str) -> bool:
        """Re-read the file if it changed (blocking), then :meth:`matches`."""
        self._reload()
        return self.matches(token)

    def matches(self, token: str) -> bool:
        """Whether ``token`` is one of the tokens read last, compared in constant time against every one."""
        _, digests = self._state
        given = _digest(token.encode("utf-8", "surrogateescape"))
        accepted = False
        for expected in digests:  # no early exit: every token costs the same
            accepted |= hmac.compare_digest(given, expected)
        return accepted


def bearer_token(authorization: Sequence[str]) -> str | None:
    """The token of the ``authorization`` metadata values, or None if there is not exactly one
    ``Bearer`` value (RFC 6750: the scheme's case does not matter)."""
    if len(authorization) != 1:
        return None
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class AccessPolicy:
    """The rule itself, free of gRPC: ``check`` raises if a call may not proceed."""

    tokens: TokenFile | None  # None: no --auth-token-file
    protect_inference: bool = False  # --auth-scope all

    def needs_check(self, scope: Scope) -> bool:
        """False where every call of ``scope`` is let through, whoever sends it."""
        if scope is Scope.OPEN:
            return False
        if scope is Scope.INFERENCE:
            return self.tokens is not None and self.protect_inference
        return True

    def check(self, scope: Scope, authorization: Sequence[str], peer: str) -> None:
        if not self.needs_check(scope):
            return
        if scope is Scope.HOST_MANAGEMENT and not is_loopback_peer(peer):
            raise PermissionDeniedError(host_only_message("system shared memory calls"))
        if self.tokens is None:  # only management gets here
            if is_loopback_peer(peer):
                return
            raise PermissionDeniedError(
                "management calls (fine-tuning, model deletion, model load/unload) are accepted only from "
                "this host when the server has no token: start vision-serve with --auth-token-file FILE "
                "(one token a line) and send 'authorization: Bearer <token>'"
            )
        if not authorization:
            raise AuthenticationError(
                f"this call needs 'authorization: Bearer <token>' metadata ({scope.value} calls are protected "
                "by the server's --auth-token-file)"
            )
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationError("send exactly one 'authorization: Bearer <token>' metadata entry")
        if not self.tokens.matches(token):
            raise AuthenticationError("the bearer token is not valid for this server")


def host_only_message(what: str) -> str:
    return (
        f"{what} are accepted from this host only (a loopback peer): shared memory regions are files of "
        "the server's host; from another host send tensors in the request"
    )


def policy_from(auth_token_file: Path | None, auth_scope: str) -> AccessPolicy:
    if auth_scope == "all" and auth_token_file is None:
        raise FailedPreconditionError(
            "--auth-scope all protects inference with the tokens of --auth-token-file: set --auth-token-file too"
        )
    tokens = TokenFile(auth_token_file) if auth_token_file is not None else None
    return AccessPolicy(tokens, protect_inference=auth_scope == "all")


class AuthorizationInterceptor(HandlerInterceptor):
    """Applies an :class:`AccessPolicy` to every call, before the handler reads any request."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        scope = scope_of(details.method)
        if not self._policy.needs_check(scope):
            return handler
        authorization = [
            value if isinstance(value, str) else value.decode("latin-1")
            for key, value in details.invocation_metadata or ()
            if key == "authorization"
        ]

        tokens = self._policy.tokens

        async def check(context: AioContext) -> None:
            if tokens is not None:
                await tokens.refresh()  # off the event loop
            self._policy.check(scope, authorization, context.peer())

        return _guarded(handler, check)


def _guarded(
    handler: grpc.RpcMethodHandler[Req, Resp], check: Callable[[AioContext], Awaitable[None]]
) -> grpc.RpcMethodHandler[Req, Resp]:
    """``handler`` with ``check(context)`` run before its behaviour."""
    given = behaviors(handler)
    behavior = given.unary_unary or given.stream_unary
    if behavior is not None:

        async def unary(request: Any, context: AioContext) -> Any:
            await check(context)
            return await behavior(request, context)

        if given.unary_unary:
            return replace(handler, unary_unary=unary)
        return replace(handler, stream_unary=unary)

    stream_behavior = given.unary_stream or given.stream_stream
    assert stream_behavior is not None, "a method handler has one behaviour"

    async def stream(request: Any, context: AioContext) -> AsyncIterator[Any]:
        await check(context)
        async for response in responses(stream_behavior, request, context):
            yield response

    if given.unary_stream:
        return replace(handler, unary_stream=stream)
    return replace(handler, stream_stream=stream)
