"""TLS server credentials that follow their files: certificates rotate without a restart.

gRPC asks :meth:`CertificateFiles.fetch` for the current configuration before each new
handshake; it answers None (keep what you have) unless a file changed since the last
load. A changed set of files is checked (certificate and key parse and match, the client
CA parses) before it is served; a bad set is logged and the previous one keeps serving,
so a half-finished rotation never takes the server off the air. Connections already open
keep the certificate they were set up with.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import FailedPreconditionError

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


@dataclass(frozen=True)
class _Loaded:
    signature: tuple[tuple[int, ...], ...]
    config: grpc.ServerCertificateConfiguration


class CertificateFiles:
    """Reads and checks :class:`TlsFiles`; builds credentials that re-read them on change."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        try:
            self._current = self._load()
        except (OSError, ssl.SSLError, ValueError, _Changing) as exc:
            raise FailedPreconditionError(
                f"cannot use the TLS files ({', '.join(map(str, files.paths()))}): {exc}; pass a PEM certificate "
                "chain, its PEM private key (unencrypted) and, for mutual TLS, a PEM CA bundle"
            ) from exc
        self._rejected: tuple[tuple[int, ...], ...] | None = None  # a bad set of files, not tried again
        self._last_error = ""

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

    def _load(self) -> _Loaded:
        before = self._signature()
        cert = self.files.cert.read_bytes()
        key = self.files.key.read_bytes()
        ca = self.files.client_ca.read_bytes() if self.files.client_ca is not None else None
        # The standard library parses the PEM and checks that the key belongs to the certificate.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.files.cert, self.files.key)
        if ca is not None:
            context.load_verify_locations(cadata=ca.decode("ascii"))
        if self._signature() != before:
            raise _Changing("the files changed while they were read; try again")
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        return _Loaded(before, config)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration, or None for no change.

        Runs before every handshake, so it costs one ``stat`` per file when nothing changed.
        It never raises: gRPC would fail the handshake.
        """
        try:
            signature = self._signature()
            if signature in (self._current.signature, self._rejected):
                return None
            loaded = self._load()
        except _Changing:
            return None
        except Exception as exc:  # whatever it is, keep serving the old certificate
            try:
                self._rejected = self._signature()
            except OSError:
                self._rejected = None  # a file is missing: look again at the next handshake
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                log.error("TLS files changed but cannot be used (%s); still serving the previous certificate", exc)
            return None
        self._current, self._rejected, self._last_error = loaded, None, ""
        log.info("TLS certificate re-read from %s", ", ".join(map(str, self.files.paths())))
        return loaded.config
