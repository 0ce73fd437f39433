"""How a client's channel is secured: TLS credentials, and when a token may travel in plaintext.

A target that is a URL (``http://host:8000``, ``https://host``) names the HTTP binding: its
TLS is an :class:`ssl.SSLContext` made from the same options (:func:`http_tls`).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import grpc

PemSource = str | os.PathLike[str] | bytes
"""A PEM file's path (``str`` or ``pathlib.Path``), or the PEM bytes themselves."""


def _read_pem(what: str, source: PemSource | None) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read {os.fspath(source)!r}: {exc.strerror or exc}") from exc
    else:
        raise TypeError(f"{what} must be a path or PEM bytes, got {type(source).__name__}")
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} is not PEM (no '-----BEGIN' line); pass a PEM file's path or its bytes")
    return data


def channel_credentials(
    tls: bool | grpc.ChannelCredentials | None,
    root_certificates: PemSource | None = None,
    client_certificate: PemSource | None = None,
    client_key: PemSource | None = None,
) -> grpc.ChannelCredentials | None:
    """The channel's credentials, None for plaintext.

    ``tls=None`` means TLS exactly when a certificate option is given; ``tls=True`` with no
    ``root_certificates`` trusts the system's roots. ``client_certificate`` and ``client_key``
    (mutual TLS) come together.
    """
    pems = {"root_certificates": root_certificates, "client_certificate": client_certificate, "client_key": client_key}
    given = [name for name, value in pems.items() if value is not None]
    if isinstance(tls, grpc.ChannelCredentials):
        if given:
            raise ValueError(f"pass either tls=<grpc.ChannelCredentials> or {', '.join(given)}, not both")
        return tls
    if tls is not None and not isinstance(tls, bool):
        raise TypeError(f"tls must be a bool, None or grpc.ChannelCredentials, got {type(tls).__name__}")
    if tls is False:
        if given:
            raise ValueError(f"{', '.join(given)} need TLS: leave tls unset or pass tls=True")
        return None
    if tls is None and not given:
        return None
    if (client_certificate is None) != (client_key is None):
        raise ValueError("mutual TLS needs both client_certificate and client_key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem("root_certificates", root_certificates),
        private_key=_read_pem("client_key", client_key),
        certificate_chain=_read_pem("client_certificate", client_certificate),
    )


def _host_of(address: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") == 1:
        return address.partition(":")[0]
    return address  # a name without a port, or a bare IPv6 address


def _is_loopback_host(host: str) -> bool:
    host = host.strip().lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_target(target: str) -> bool:
    """Whether every address a gRPC target names is this host: ``localhost``, 127.0.0.0/8,
    ``::1`` or a Unix socket. ``dns:`` names other than localhost are not (they could resolve
    anywhere); nor is anything this function cannot parse."""
    target = unquote(target.strip())
    scheme, colon, rest = target.partition(":")
    if colon and scheme in ("unix", "unix-abstract"):
        return True
    if colon and scheme == "dns":
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # dns://authority/host:port
        return bool(rest) and _is_loopback_host(_host_of(rest))
    if colon and scheme in ("ipv4", "ipv6"):
        addresses = [a for a in rest.split(",") if a]
        return bool(addresses) and all(_is_loopback_host(_host_of(a)) for a in addresses)
    return _is_loopback_host(_host_of(target))


@dataclass(frozen=True)
class HttpTarget:
    """An ``http://`` or ``https://`` URL as the HTTP binding's base URL."""

    base_url: str
    host: str
    secure: bool


def http_target(target: str) -> HttpTarget | None:
    """The HTTP binding's target when ``target`` is an ``http://`` or ``https://`` URL, else None."""
    scheme, _, _ = target.partition("://")
    if scheme.lower() not in ("http", "https") or "://" not in target:
        return None
    parts = urlsplit(target.strip())
    if not parts.hostname:
        raise ValueError(f"{target!r} names no host: pass e.g. 'http://localhost:8000'")
    if parts.query or parts.fragment:
        raise ValueError(f"{target!r}: a base URL takes no query or fragment, e.g. 'http://localhost:8000'")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"{target!r}: the port is not a number from 0 to 65535") from None
    return HttpTarget(
        base_url=f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}",
        host=parts.hostname,
        secure=parts.scheme.lower() == "https",
    )


def http_tls(
    target: HttpTarget,
    tls: bool | grpc.ChannelCredentials | None,
    root_certificates: PemSource | None = None,
    client_certificate: PemSource | None = None,
    client_key: PemSource | None = None,
) -> ssl.SSLContext | None:
    """The TLS of an HTTP target: an ``SSLContext`` for ``https://`` (the system's roots unless
    ``root_certificates`` is given; mutual TLS with ``client_certificate`` and ``client_key``),
    None for ``http://``. The scheme decides; options that contradict it are refused."""
    pems = {"root_certificates": root_certificates, "client_certificate": client_certificate, "client_key": client_key}
    given = [name for name, value in pems.items() if value is not None]
    if isinstance(tls, grpc.ChannelCredentials):
        raise ValueError(
            "tls=<grpc.ChannelCredentials> is for gRPC targets; for an https:// URL pass tls=True, "
            "root_certificates=, client_certificate= and client_key="
        )
    if tls is not None and not isinstance(tls, bool):
        raise TypeError(f"tls must be a bool, None or grpc.ChannelCredentials, got {type(tls).__name__}")
    if not target.secure:
        if tls or given:
            what = ", ".join(given) or "tls=True"
            raise ValueError(f"{what} need TLS, but {target.base_url!r} is plain HTTP: use an https:// URL")
        return None
    if tls is False:
        raise ValueError(f"{target.base_url!r} is HTTPS, which is TLS: pass an http:// URL for plain HTTP")
    if (client_certificate is None) != (client_key is None):
        raise ValueError("mutual TLS needs both client_certificate and client_key")
    roots = _read_pem("root_certificates", root_certificates)
    context = ssl.create_default_context(cadata=None if roots is None else roots.decode("ascii", "replace"))
    certificate = _read_pem("client_certificate", client_certificate)
    key = _read_pem("client_key", client_key)
    if certificate is not None and key is not None:
        # ssl loads a key pair from files only: a private directory, gone once they are read.
        with tempfile.TemporaryDirectory(prefix="vision-client-") as directory:
            certificate_file = os.path.join(directory, "certificate.pem")
            key_file = os.path.join(directory, "key.pem")
            for path, data in ((certificate_file, certificate), (key_file, key)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                    file.write(data)
            try:
                context.load_cert_chain(certificate_file, key_file)
            except ssl.SSLError as error:
                raise ValueError(f"client_certificate and client_key are not a matching pair: {error}") from None
    return context


def check_token_transport(
    target: str, token: str | None, credentials: grpc.ChannelCredentials | None, allow_insecure_token: bool
) -> None:
    """Refuse to send a token in plaintext off this host unless the caller opted in."""
    web = http_target(target)
    if web is not None:
        if token is None or web.secure or allow_insecure_token or _is_loopback_host(web.host):
            return
    elif token is None or credentials is not None or allow_insecure_token or is_loopback_target(target):
        return
    raise ValueError(
        f"refusing to send the token in plaintext to {target!r}: anyone on the network path could read it "
        "and use it to fine-tune, replace or delete models. Connect with TLS (tls=True, or "
        "root_certificates=<CA file> for a private CA; CLI: --tls or --tls-ca FILE; over HTTP an https:// URL), "
        "or, where the network "
        "itself is trusted or encrypted (a service mesh with mTLS, a VPN), pass allow_insecure_token=True "
        "(CLI: --allow-insecure-token)"
    )
