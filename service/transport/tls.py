"""TLS server credentials that follow their files: certificates rotate without a restart.

gRPC asks :meth:`CertificateFiles.fetch` for the current configuration before each new
handshake; it answers None (keep what you have) unless a file changed since the last
load. The HTTP port takes :meth:`CertificateFiles.ssl_context` for each new connection, the
same files' ``ssl.SSLContext``, rebuilt when they changed. A changed set of files is checked
before it is served: the certificate and key parse and match, the certificate is valid now (not
expired, not yet to come), the client CA parses. A bad set is logged once, counted
(``vision_tls_reload_errors_total{reason}``), and the previous one keeps serving, so a
half-finished or mistaken rotation never takes the server off the air. Connections already open
keep the certificate they were set up with. The files are read through the one bounded reader
(regular files of sane size; symlinks followed, as a mounted Secret is one).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from service.errors import FailedPreconditionError
from service.host.files import MAX_TLS_FILE_BYTES, FileRefused, read_bounded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mutual TLS when set

    @classmethod
    def from_options(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
        """The files of ``--tls-cert-file``/``--tls-key-file``/``--tls-client-ca-file``, or None
        for plaintext; refuses combinations that cannot work."""
        if cert is None and key is None:
            if client_ca is not None:
                raise FailedPreconditionError(
                    "--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file: the server "
                    "must present a certificate of its own"
                )
            return None
        if cert is None or key is None:
            missing = "--tls-key-file" if key is None else "--tls-cert-file"
            raise FailedPreconditionError(f"TLS needs both --tls-cert-file and --tls-key-file; {missing} is missing")
        return cls(cert, key, client_ca)

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


class _Changing(Exception):
    """The files changed while they were read: a rotation is in progress; try again later."""


class CertificateRejected(Exception):
    """A set of TLS files that cannot work; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_certificate(cert: bytes, key: bytes, client_ca: bytes | None, *, now: datetime | None = None) -> None:
    """Raise :class:`CertificateRejected` unless ``cert`` (a PEM chain) and ``key`` can serve TLS
    now: both parse, the key is the certificate's, the certificate is within its validity."""
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError as exc:
        raise CertificateRejected("malformed", f"the certificate file holds no PEM certificate ({exc})") from exc
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise CertificateRejected("malformed", f"the key file holds no unencrypted PEM private key ({exc})") from exc
    leaf = chain[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private_key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CertificateRejected("key_mismatch", "the private key does not belong to the certificate")
    now = now or datetime.now(timezone.utc)
    if now < leaf.not_valid_before_utc:
        raise CertificateRejected(
            "not_yet_valid", f"the certificate is valid only from {leaf.not_valid_before_utc.isoformat()}"
        )
    if now > leaf.not_valid_after_utc:
        raise CertificateRejected("expired", f"the certificate expired at {leaf.not_valid_after_utc.isoformat()}")
    if client_ca is not None:
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError as exc:
            raise CertificateRejected("malformed", f"the client CA file holds no PEM certificate ({exc})") from exc


@dataclass(frozen=True)
class _Loaded:
    signature: tuple[tuple[int, ...], ...]
    config: grpc.ServerCertificateConfiguration
    cert: bytes
    key: bytes
    client_ca: bytes | None
    generation: int  # counts the sets of files loaded: each port follows it


class CertificateFiles:
    """Reads and checks :class:`TlsFiles`; builds credentials that re-read them on change."""

    def __init__(self, files: TlsFiles, on_rejected: Callable[[str], None] | None = None) -> None:
        self.files = files
        self._on_rejected = on_rejected or (lambda reason: None)
        try:
            self._current = self._load(0)
        except (OSError, FileRefused, CertificateRejected, _Changing) as exc:
            raise FailedPreconditionError(
                f"cannot use the TLS files ({', '.join(map(str, files.paths()))}): {exc}; pass a PEM certificate "
                "chain valid now, its PEM private key (unencrypted) and, for mutual TLS, a PEM CA bundle"
            ) from exc
        self._rejected: tuple[tuple[int, ...], ...] | None = None  # a bad set of files, not tried again
        self._last_error = ""
        self._grpc_generation = 0  # what gRPC serves (it got the first set with credentials())
        self._ssl: tuple[int, ssl.SSLContext] | None = None  # the HTTP port's context and its generation
        # gRPC's fetcher runs in gRPC's threads, the HTTP port's on the event loop: one refresh at a time.
        self._refreshing = threading.Lock()

    @property
    def mutual(self) -> bool:
        return self.files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current.config,
            self.fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"; its stubs do not
            require_client_authentication=self.mutual,
        )

    def _signature(self) -> tuple[tuple[int, ...], ...]:
        out = []
        for path in self.files.paths():
            st = os.stat(path)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def _read(self, path: Path) -> bytes:
        return read_bounded(path, MAX_TLS_FILE_BYTES, follow_symlinks=True)

    def _load(self, generation: int) -> _Loaded:
        before = self._signature()
        cert = self._read(self.files.cert)
        key = self._read(self.files.key)
        ca = self._read(self.files.client_ca) if self.files.client_ca is not None else None
        if self._signature() != before:
            raise _Changing("the files changed while they were read; try again")
        check_certificate(cert, key, ca)
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        return _Loaded(before, config, cert, key, ca, generation)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration, or None for no change.

        Runs before every handshake, so it costs one ``stat`` per file when nothing changed.
        It never raises: gRPC would fail the handshake.
        """
        current = self.refresh()
        if current.generation == self._grpc_generation:
            return None
        self._grpc_generation = current.generation
        return current.config

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP port's server context for a new connection: the current files' (one ``stat``
        per file when nothing changed; a changed set is checked as gRPC's is)."""
        current = self.refresh()
        if self._ssl is None or self._ssl[0] != current.generation:
            self._ssl = (current.generation, _server_context(current))
        return self._ssl[1]

    def refresh(self) -> _Loaded:
        """The set of files to serve now: the one last loaded, or the files again if they changed
        and can be used. Never raises: a bad set is logged and counted, the previous one stays."""
        with self._refreshing:
            return self._refresh()

    def _refresh(self) -> _Loaded:
        try:
            signature = self._signature()
            if signature in (self._current.signature, self._rejected):
                return self._current
            loaded = self._load(self._current.generation + 1)
        except _Changing:
            return self._current
        except Exception as exc:  # whatever it is, keep serving the old certificate
            try:
                self._rejected = self._signature()
            except OSError:
                self._rejected = None  # a file is missing: look again at the next handshake
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                reason = exc.reason if isinstance(exc, (CertificateRejected, FileRefused)) else "unreadable"
                log.error("TLS files changed but cannot be used (%s); still serving the previous certificate", exc)
                self._on_rejected(reason)
            return self._current
        self._current, self._rejected, self._last_error = loaded, None, ""
        log.info("TLS certificate re-read from %s", ", ".join(map(str, self.files.paths())))
        return loaded


def _server_context(loaded: _Loaded) -> ssl.SSLContext:
    """A TLS 1.2+ server context of checked PEM bytes. ``ssl`` loads a certificate chain from files
    only: the bytes go through a private temporary directory that is gone once they are loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="vision-tls-") as directory:  # mode 0700
        cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
        for path, data in ((cert, loaded.cert), (key, loaded.key)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        context.load_cert_chain(cert, key)
    if loaded.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=loaded.client_ca.decode("ascii", "replace"))
    return context
