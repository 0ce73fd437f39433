"""The SDK's channel security: certificate options, and no tokens in plaintext off this host."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.certs import CertificateAuthority, write_pair
from vision_client import AsyncClient, Client
from vision_client._channel import channel_credentials, is_loopback_target
from vision_client.cli import main as cli_main

pytest.importorskip("cryptography", reason="cryptography comes with the [test] extra")


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("localhost:8001", True),
        ("LOCALHOST:8001", True),
        ("localhost", True),
        ("api.localhost:1", True),  # RFC 6761
        ("127.0.0.1:8001", True),
        ("127.1.2.3:8001", True),
        ("[::1]:8001", True),
        ("::1", True),
        ("[::ffff:127.0.0.1]:1", True),
        ("dns:///localhost:8001", True),
        ("dns://8.8.8.8/localhost:8001", True),  # the authority is the DNS server, not the target
        ("dns:localhost:8001", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv6:[::1]:1", True),
        ("ipv6:%5B::1%5D:1", True),
        ("unix:/run/vision.sock", True),
        ("unix:///run/vision.sock", True),
        ("unix-abstract:vision", True),
        ("10.0.0.5:8001", False),
        ("vision.example.com:443", False),
        ("localhost.example.com:443", False),
        ("dns:///vision-serving-headless.ml.svc.cluster.local:8001", False),
        ("dns://127.0.0.1/vision.example.com:8001", False),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),  # every address must be local
        ("[2001:db8::1]:8001", False),
        ("[::ffff:10.0.0.1]:1", False),
        ("0.0.0.0:8001", False),
        ("xds:///vision", False),
    ],
)
def test_loopback_targets(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback


@pytest.mark.parametrize("client_type", [Client, AsyncClient])
def test_a_token_is_not_sent_in_plaintext_off_this_host(client_type, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refusing to send the token in plaintext") as refused:
        client_type("vision.example.com:8001", token="secret")
    message = str(refused.value)
    assert "tls=True" in message and "allow_insecure_token=True" in message
    # What is allowed: no token, loopback, TLS, or an explicit opt-in. Nothing connects yet.
    client_type("vision.example.com:8001")
    client_type("localhost:8001", token="secret")
    client_type("vision.example.com:8001", token="secret", tls=True)
    client_type("vision.example.com:8001", token="secret", allow_insecure_token=True)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(CertificateAuthority("ca").pem)
    client_type("vision.example.com:8001", token="secret", root_certificates=ca)


def test_certificate_options_that_cannot_work_are_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority("ca")
    pair = ca.issue("client", server=False)
    cert, key = write_pair(tmp_path, pair, "client")
    assert channel_credentials(None) is None
    assert channel_credentials(False) is None
    assert isinstance(channel_credentials(True), grpc.ChannelCredentials)
    assert isinstance(channel_credentials(None, ca.pem), grpc.ChannelCredentials)  # implies TLS
    assert isinstance(channel_credentials(None, str(tmp_path / "client.crt"), cert, key), grpc.ChannelCredentials)
    assert isinstance(channel_credentials(True, None, pair.cert, pair.key), grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="need TLS"):
        channel_credentials(False, ca.pem)
    with pytest.raises(ValueError, match="both client_certificate and client_key"):
        channel_credentials(True, ca.pem, cert, None)
    with pytest.raises(ValueError, match="both client_certificate and client_key"):
        channel_credentials(None, None, None, key)
    with pytest.raises(ValueError, match="not PEM"):
        channel_credentials(None, b"hello")
    with pytest.raises(ValueError, match="cannot read"):
        channel_credentials(None, tmp_path / "missing.pem")
    with pytest.raises(TypeError, match="path or PEM bytes"):
        channel_credentials(None, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        channel_credentials(grpc.ssl_channel_credentials(), ca.pem)
    with pytest.raises(TypeError, match="tls must be"):
        channel_credentials("yes")  # type: ignore[arg-type]


def test_cli_connects_with_tls_options(serve_inprocess, tmp_path: Path, capsys) -> None:
    ca = CertificateAuthority("cli CA")
    server_cert, server_key = write_pair(tmp_path / "server", ca.issue("localhost", server=True), "server")
    client_cert, client_key = write_pair(tmp_path / "client", ca.issue("cli", server=False), "client")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    server = serve_inprocess(tls_cert_file=server_cert, tls_key_file=server_key, tls_client_ca_file=ca_file)
    common = ["--target", server.target, "--timeout", "10"]
    mtls = ["--tls-ca", str(ca_file), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]
    assert cli_main([*common, *mtls, "health"]) == 0
    assert cli_main([*common, "health", *mtls, "--json"]) == 0  # options after the command too
    capsys.readouterr()
    assert cli_main([*common, "--tls-ca", str(ca_file), "--tls-cert", str(client_cert), "health"]) == 1
    assert "client_key" in capsys.readouterr().err
    assert cli_main(["--target", "vision.example.com:8001", "--token", "t", "health"]) == 1
    assert "refusing to send the token in plaintext" in capsys.readouterr().err
