"""Who may call what: RPC scopes, bearer tokens with scopes, the loopback rule, and browsers.

Every RPC belongs to one scope (:data:`RPC_SCOPES`, the one table of them):

- ``open``: health checks, for probes and load balancers; never refused.
- ``inference``: ModelInfer, ModelStreamInfer, metadata, configuration, statistics,
  reflection. Needs a token only with ``--auth-scope all``.
- ``management``: FineTuning (model deletion included), RepositoryModelLoad/Unload,
  and any method the table does not know. With ``--auth-token-file`` it needs
  ``authorization: Bearer <token>``; without one it is accepted from this host only, so that
  an unconfigured server reachable over a network cannot be retrained.
- ``shared-memory``: Triton's system shared memory calls. They make the server open a file of
  this host and write into it, which only a caller on this host has a reason to ask: from this
  host only, always, and then the token (if the server has a token file).

**Tokens carry scopes.** A line of the token file is a token, alone (every scope, as before
scopes existed) or followed by ``scopes=`` and a comma list of :data:`TOKEN_SCOPES`
(:func:`parse_tokens`). A valid token without the call's scope is PERMISSION_DENIED, naming it.

**"This host".** A caller counts as this host (:meth:`AccessPolicy.is_local`) when its peer is
loopback and, over HTTP, when its ``Host`` header names this host too: an IP literal,
``localhost``, ``*.localhost``, a name without a dot or a name of ``--allowed-hosts``. A browser on this host is a
loopback peer, so without the ``Host`` check a page of any site whose name resolves to 127.0.0.1
(DNS rebinding) would count as this host. gRPC is not checked (no browser can drive the gRPC
port: see docs/security.md).

**Browsers.** :func:`cross_site` names what in a state-changing HTTP request shows that a page of
another site sent it (``Origin``, ``Sec-Fetch-Site``); the HTTP port refuses those whatever the
route, token or peer, so a page cannot use the loopback rule as an ambient credential.

Refusals are :class:`AuthenticationError` (UNAUTHENTICATED: missing or wrong token)
or :class:`PermissionDeniedError` (PERMISSION_DENIED: not this host and no token file, a token
without the scope, a foreign site), raised inside the method's handler so that the
error-mapping interceptor, outside this one, answers them.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc

from service.errors import AuthenticationError, FailedPreconditionError, PermissionDeniedError, quote
from service.host.files import MAX_TOKEN_FILE_BYTES, SMALL_FILE_TIMEOUT_S, FileRefused, in_daemon_thread, read_bounded
from service.transport.handlers import AioContext, HandlerInterceptor, Req, Resp, behaviors, replace, responses

log = logging.getLogger(__name__)


class Scope(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    MANAGEMENT = "management"
    SHARED_MEMORY = "shared-memory"  # from this host only, whatever the token


# The scopes a token may carry (``scopes=`` in the token file); a bare token carries them all.
TOKEN_SCOPES: tuple[Scope, ...] = (Scope.INFERENCE, Scope.MANAGEMENT, Scope.SHARED_MEMORY)
ALL_SCOPES = frozenset(TOKEN_SCOPES)

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
    # System shared memory names files of this host: its own scope, and from this host only.
    _INFERENCE_SERVICE + "SystemSharedMemoryStatus": Scope.SHARED_MEMORY,
    _INFERENCE_SERVICE + "SystemSharedMemoryRegister": Scope.SHARED_MEMORY,
    _INFERENCE_SERVICE + "SystemSharedMemoryUnregister": Scope.SHARED_MEMORY,
    # Triton's trace extension: changes what the server records and sends to its collector.
    _INFERENCE_SERVICE + "TraceSetting": Scope.MANAGEMENT,
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
    # Rolling a model back changes what every replica serves, as a publish or a delete does.
    "/vision.v1.Models/RollbackModel": Scope.MANAGEMENT,
    # Reflection describes the API (what grpcurl needs); it reveals no model or data.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Scope.INFERENCE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Scope.INFERENCE,
}


def scope_of(method: str) -> Scope:
    """The scope of a full method name; an unknown method gets the stricter ``management``."""
    return RPC_SCOPES.get(method, Scope.MANAGEMENT)


@functools.lru_cache(maxsize=4096)  # each call's peer is parsed; a client's calls share one string
def peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a gRPC peer string (``ServicerContext.peer()``, or the HTTP port's
    :func:`~service.transport.rest.routes.peer`), or None for a Unix socket or anything unparsable.

    gRPC percent-encodes the brackets of IPv6 peers (``ipv6:%5B::1%5D:5``); both forms are
    understood. An IPv6 zone id is dropped; an IPv4-mapped address (``::ffff:127.0.0.1``) is
    given as the IPv4 address it maps."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6") or not rest:
        return None
    address = unquote(rest)
    if address.startswith("["):
        host, bracket, _ = address[1:].partition("]")
        if not bracket:
            return None
    elif scheme == "ipv4":
        host = address.rpartition(":")[0] or address
    else:
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer string is this host: 127.0.0.0/8, ::1 (and the IPv4-mapped forms of
    those) and Unix domain sockets. Anything unparsable is not loopback."""
    if peer.partition(":")[0] in ("unix", "unix-abstract"):
        return True
    ip = peer_ip(peer)
    return ip is not None and ip.is_loopback


# The peer a protocol front end forwards with each call it passes to the engine (whose own peer
# is the front end, on a Unix socket). Only the engine reads it, and only on its Unix socket, which
# front ends alone can reach; front ends never pass a caller's metadata of this name on.
FORWARDED_PEER = "x-vision-peer"
_forwarded_peers_trusted = False


def trust_forwarded_peers() -> None:
    """Make this process (the engine) read callers' peers from :data:`FORWARDED_PEER`."""
    global _forwarded_peers_trusted
    _forwarded_peers_trusted = True


def caller_peer(context: Any) -> str:
    """The caller of a gRPC call as a peer string: ``context.peer()``, or in the engine the peer
    the front end that forwarded the call names."""
    if _forwarded_peers_trusted:
        for key, value in context.invocation_metadata() or ():
            if key == FORWARDED_PEER:
                return value if isinstance(value, str) else value.decode("latin-1")
    return str(context.peer())


# -- host names and browsers ------------------------------------------------------------------


def _split_host(host: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a ``Host`` header or an origin's authority, the name lower-case without
    a trailing dot (IPv6 without brackets); None if it is not one."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        name, colon, port_text = host.partition(":")
        if colon and not port_text:
            return None
    if port_text and not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        return None
    name = name.rstrip(".")
    if not name:
        return None
    return name, int(port_text) if port_text else None


def names_this_host(host: str, allowed_hosts: Iterable[str] = ()) -> bool:
    """Whether an HTTP ``Host`` header names this host: an IP literal, ``localhost``,
    ``*.localhost`` (RFC 6761: always loopback), a name of one label (no dot: the machine's own
    host name, a name of ``/etc/hosts`` or of the local network's resolver) or one of
    ``allowed_hosts`` (``*``: any name).

    A page that DNS rebinding brought to 127.0.0.1 sends its own site's name (a browser's Host
    is the name in the page's URL): a name in public DNS, which is what its author controls,
    and so a dotted one; an IP literal is never rebound."""
    split = _split_host(host)
    if split is None:
        return False
    name = split[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if "." not in name or name.endswith(".localhost"):
        return True
    allowed = {entry.strip().lower().rstrip(".") for entry in allowed_hosts}
    return name in allowed or "*" in allowed


def is_loopback_address(host: str) -> bool:
    """Whether a listening address (``--host``) is loopback only: the operator meant this host alone."""
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_DEFAULT_PORTS = {"http": 80, "https": 443}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same_origin(origin: str, host: str) -> bool:
    """Whether an ``Origin`` header is the origin of the request's own ``Host`` (as Jupyter's
    ``check_origin`` compares them): same name, same port (an absent one is the scheme's default).
    ``null`` (a sandboxed frame, a file, a redirect) is no origin and never the same."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        return False
    given, ours = _split_host(parts.netloc), _split_host(host)
    if given is None or ours is None:
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    return given[0] == ours[0] and (given[1] or default) == (ours[1] or default)


def cross_site(method: str, origins: Sequence[str], fetch_site: str | None, host: str) -> str | None:
    """What shows that a page of another site sent this request, or None.

    Only state-changing methods are judged (a page of another site cannot read the answers of
    the others: the server sends no CORS headers). Browsers send ``Origin`` with every request
    other than GET and HEAD, and current ones ``Sec-Fetch-Site`` with every request; neither can
    be set by a page. Curl, tritonclient and the SDK send neither, and are not judged."""
    if method.upper() in SAFE_METHODS:
        return None
    site = (fetch_site or "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site: {site}"
    if len(origins) > 1:
        return "more than one Origin"
    if origins and not same_origin(origins[0], host):
        return f"Origin {quote(origins[0])}, not the origin of Host {quote(host)}"
    return None


def cross_site_message(method: str, path: str, evidence: str) -> str:
    return (
        f"refused {method} {quote(path)}: a web page of another site sent it ({evidence}). This server "
        "changes state only for requests from its own pages (the console at /) and from programs "
        "(curl, tritonclient, the SDK), which send no Origin"
    )


def foreign_host_message(host: str) -> str:
    return (
        f"the Host header {quote(host)} does not name this server, so this loopback connection does not "
        "count as this host (it may be a web page that DNS rebinding sent here): use an IP address or "
        "localhost in the URL, start vision-serve with --allowed-hosts NAME for a name of this host, "
        "or set --auth-token-file and send a token"
    )


# -- the token file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGrant:
    """One line of the token file: a token and the scopes it carries."""

    token: str
    scopes: frozenset[Scope] = ALL_SCOPES


class TokenFileError(ValueError):
    """Lines of a token file that cannot be read; the message names their numbers, never a token."""


_SCOPES_FIELD = "scopes="
_SCOPE_NAMES = {scope.value: scope for scope in TOKEN_SCOPES}
TOKEN_LINE_FORMAT = "a token alone (every scope), or a token, a space and scopes=" + ",".join(_SCOPE_NAMES)


def parse_tokens(text: str) -> tuple[TokenGrant, ...]:
    """The grants of a token file's text.

    A line is blank, a comment (its first non-blank character is ``#``), or a token followed by
    nothing or by one ``scopes=inference,management,shared-memory`` field, separated by spaces or
    tabs. A token is one word of printable ASCII: a line holding two words that are not a token
    and its ``scopes=`` is refused rather than guessed at (a token with a space, a comment after
    a token), as are unknown scopes and a token given twice. Every refused line is named by its
    number in one :class:`TokenFileError`; no part of a token is ever quoted.
    """
    grants: list[TokenGrant] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        token, extra = fields[0], fields[1:]
        if not all(33 <= ord(character) <= 126 for character in token):
            problems.append(f"line {number}: the token holds a character that is not printable ASCII")
            continue
        scopes: frozenset[Scope] = ALL_SCOPES
        if extra:
            if len(extra) > 1 or not extra[0].startswith(_SCOPES_FIELD):
                problems.append(
                    f"line {number}: more than a token and its scopes= (a token is one word without spaces; "
                    "comments go on lines of their own, starting with #)"
                )
                continue
            names = [name.strip() for name in extra[0][len(_SCOPES_FIELD) :].split(",")]
            unknown = [name for name in names if name not in _SCOPE_NAMES]
            if unknown:
                problems.append(
                    f"line {number}: unknown scope {quote(unknown[0], 40)}; scopes are {', '.join(_SCOPE_NAMES)}"
                )
                continue
            scopes = frozenset(_SCOPE_NAMES[name] for name in names)
        if token in first_line:
            problems.append(f"line {number}: the same token as line {first_line[token]}; give each token one line")
            continue
        first_line[token] = number
        grants.append(TokenGrant(token, scopes))
    if problems:
        raise TokenFileError("; ".join(problems))
    return tuple(grants)


def _digest(token: bytes) -> bytes:
    # Comparing digests of equal length keeps even a token's length out of the timing.
    return hashlib.sha256(token).digest()


class TokenFile:
    """The tokens of ``--auth-token-file`` and their scopes, read again whenever the file changes.

    The file is checked (one ``stat``) before each protected call; a new inode, size or
    modification time makes it read again, so a token can be added, rolled out to
    clients and the old one removed without a restart (Kubernetes updates a mounted
    Secret by swapping a symlink: a new inode). A file that disappears, becomes empty, holds
    a line that cannot be read (:func:`parse_tokens`) or is no longer a regular file of sane
    size after start-up refuses every token (and says so in the log) until it is fixed.

    On the server the check runs off the event loop (:meth:`refresh`), in one daemon thread
    at a time, waited for a few seconds at most: a hung network file system delays protected
    calls by that much and stops nothing else; meanwhile the tokens read last stay in force.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # (file signature, (token digest, scopes) pairs), replaced whole: the reading thread swaps it.
        self._state: tuple[tuple[int, ...] | None, tuple[tuple[bytes, frozenset[Scope]], ...]] = (None, ())
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
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError, FileRefused) as exc:
            if initial:
                raise FailedPreconditionError(f"cannot read --auth-token-file {self.path}: {exc}") from exc
            if signature_before is not None:
                log.error(
                    "cannot read --auth-token-file %s (%s): refusing every token until it is back", self.path, exc
                )
            self._state = (None, ())
            return
        try:
            grants = parse_tokens(text)
        except TokenFileError as exc:
            message = f"--auth-token-file {self.path}: {exc}; a line is {TOKEN_LINE_FORMAT}"
            if initial:
                raise FailedPreconditionError(message) from None
            log.error("%s: refusing every token until it is fixed", message)
            self._state = (signature, ())
            return
        if not grants:
            message = f"--auth-token-file {self.path} holds no token; put one a line (e.g. `openssl rand -hex 32`)"
            if initial:
                raise FailedPreconditionError(message)
            log.error("%s: refusing every token until it does", message)
        for grant in grants:
            if len(grant.token) < 16:
                log.warning(
                    "a token in %s is only %d characters long: use 32 random bytes or more",
                    self.path,
                    len(grant.token),
                )
        if not initial:
            log.info("re-read %s: %d token(s)", self.path, len(grants))
        self._state = (signature, tuple((_digest(grant.token.encode("ascii")), grant.scopes) for grant in grants))

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
        """Whether ``token`` is one of the tokens read last."""
        return self.scopes_of(token) is not None

    def scopes_of(self, token: str) -> frozenset[Scope] | None:
        """The scopes of ``token`` among the tokens read last (None: not one of them), compared in
        constant time against every one."""
        _, entries = self._state
        given = _digest(token.encode("utf-8", "surrogateescape"))
        found: frozenset[Scope] | None = None
        for expected, scopes in entries:  # no early exit: every token costs the same
            if hmac.compare_digest(given, expected):
                found = scopes
        return found


def bearer_token(authorization: Sequence[str]) -> str | None:
    """The token of the ``authorization`` metadata values, or None if there is not exactly one
    ``Bearer`` value (RFC 6750: the scheme's case does not matter)."""
    if len(authorization) != 1:
        return None
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


# -- the policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessPolicy:
    """The rule itself, free of gRPC: ``check`` raises if a call may not proceed."""

    tokens: TokenFile | None  # None: no --auth-token-file
    protect_inference: bool = False  # --auth-scope all
    allowed_hosts: frozenset[str] = frozenset()  # --allowed-hosts: more names of this host

    def needs_check(self, scope: Scope) -> bool:
        """False where every call of ``scope`` is let through, whoever sends it."""
        if scope is Scope.OPEN:
            return False
        if scope is Scope.INFERENCE:
            return self.tokens is not None and self.protect_inference
        return True

    def names_this_host(self, host: str) -> bool:
        return names_this_host(host, self.allowed_hosts)

    def is_local(self, peer: str, host: str | None) -> bool:
        """Whether a caller counts as this host: a loopback peer, whose HTTP ``Host`` (None: gRPC,
        which has none to check) names this host."""
        return is_loopback_peer(peer) and (host is None or self.names_this_host(host))

    def check(self, scope: Scope, authorization: Sequence[str], peer: str, host: str | None = None) -> None:
        """``host``: the HTTP request's ``Host`` header ("" when absent), None for gRPC."""
        if not self.needs_check(scope):
            return
        local = self.is_local(peer, host)
        if scope is Scope.SHARED_MEMORY and not local:
            if is_loopback_peer(peer) and host is not None:
                raise PermissionDeniedError(foreign_host_message(host))
            raise PermissionDeniedError(host_only_message("system shared memory calls"))
        if self.tokens is None:  # management or shared memory gets here
            if local:
                return
            if is_loopback_peer(peer) and host is not None:
                raise PermissionDeniedError(foreign_host_message(host))
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
        scopes = self.tokens.scopes_of(token)
        if scopes is None:
            raise AuthenticationError("the bearer token is not valid for this server")
        if scope not in scopes:
            held = ", ".join(s.value for s in TOKEN_SCOPES if s in scopes)
            raise PermissionDeniedError(
                f"this token lacks the '{scope.value}' scope (its scopes: {held}): add {scope.value} to its "
                "scopes= in --auth-token-file, or send a token that has it"
            )


def host_only_message(what: str) -> str:
    return (
        f"{what} are accepted from this host only (a loopback peer, naming this host in Host over HTTP): "
        "shared memory regions are files of the server's host; from another host send tensors in the request"
    )


def policy_from(auth_token_file: Path | None, auth_scope: str, allowed_hosts: Iterable[str] = ()) -> AccessPolicy:
    if auth_scope == "all" and auth_token_file is None:
        raise FailedPreconditionError(
            "--auth-scope all protects inference with the tokens of --auth-token-file: set --auth-token-file too"
        )
    tokens = TokenFile(auth_token_file) if auth_token_file is not None else None
    hosts = frozenset(name.strip().lower().rstrip(".") for name in allowed_hosts if name.strip())
    return AccessPolicy(tokens, protect_inference=auth_scope == "all", allowed_hosts=hosts)


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
