"""TLS and mutual TLS on the gRPC port, with certificates made in the test.

tritonclient and our SDK work over TLS; plaintext clients and clients that trust another CA
fail; with mutual TLS, clients without a certificate or with one from another CA are refused
at the handshake; certificates rotated on disk are served to new connections without a
restart, and a broken rotation keeps the previous certificate; the plaintext health-only port
answers health checks and nothing else.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import ServeConfig
from service.errors import FailedPreconditionError
from service.host.files import MAX_TLS_FILE_BYTES
from service.transport.tls import CertificateFiles, TlsFiles
from tests.certs import CertificateAuthority, Issued, write_atomically, write_pair
from tests.metrics_util import sample_value, scrape
from vision_client import AsyncClient, Client, UnavailableError
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as infer_grpc

pytest.importorskip("cryptography", reason="cryptography comes with the [test] extra")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("vision-serving test CA")


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority("some other CA")


@pytest.fixture
def tls_files(tmp_path: Path, ca: CertificateAuthority) -> dict[str, Path]:
    cert, key = write_pair(tmp_path / "tls", ca.issue("localhost", server=True), "server")
    ca_file = tmp_path / "tls" / "ca.crt"
    ca_file.write_bytes(ca.pem)
    return {"cert": cert, "key": key, "ca": ca_file}


def _tls_server(serve_inprocess, files: dict[str, Path], *, mutual: bool = False, **overrides: object):
    return serve_inprocess(
        tls_cert_file=files["cert"],
        tls_key_file=files["key"],
        tls_client_ca_file=files["ca"] if mutual else None,
        **overrides,
    )


def _liveness(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode | int:
    """The health service "liveness" over a new channel: its status, or the call's error code."""
    # A subchannel of its own: a fresh connection, so every check is a new handshake.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.insecure_channel(target, options=options)
        if credentials is None
        else grpc.secure_channel(target, credentials, options=options)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=10
            )
        except grpc.RpcError as error:
            return error.code()
        return reply.status


SERVING = health_pb2.HealthCheckResponse.SERVING


def test_tritonclient_and_the_sdk_classify_over_tls(serve_inprocess, tls_files, photos) -> None:
    import tritonclient.grpc as triton

    server = _tls_server(serve_inprocess, tls_files)
    client = triton.InferenceServerClient(server.target, ssl=True, root_certificates=str(tls_files["ca"]))
    try:
        assert client.is_server_live()
        image = triton.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([photos["china"]], dtype=np.object_))
        logits = client.infer("alexnet", [image]).as_numpy("LOGITS")
        assert logits.shape == (1, 1000)
    finally:
        client.close()

    with Client(server.target, root_certificates=tls_files["ca"]) as sdk:  # a path
        [predictions] = sdk.classify(photos["china"], model="alexnet", top_k=3)
        assert len(predictions) == 3

    async def run_async() -> int:
        async with AsyncClient(server.target, tls=True, root_certificates=tls_files["ca"].read_bytes()) as sdk:
            return len((await sdk.classify(photos["flower"], model="alexnet", top_k=2))[0])

    assert asyncio.run(run_async()) == 2


def test_plaintext_and_untrusting_clients_fail_against_the_tls_port(serve_inprocess, tls_files, other_ca) -> None:
    server = _tls_server(serve_inprocess, tls_files, wait_loaded=False)
    assert _liveness(server.target, grpc.ssl_channel_credentials(tls_files["ca"].read_bytes())) == SERVING
    assert _liveness(server.target, None) == grpc.StatusCode.UNAVAILABLE
    assert _liveness(server.target, grpc.ssl_channel_credentials(other_ca.pem)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(
    serve_inprocess, tls_files, ca, other_ca, tmp_path, photos
) -> None:
    server = _tls_server(serve_inprocess, tls_files, mutual=True)
    trust = tls_files["ca"].read_bytes()
    good = ca.issue("a client", server=False)
    foreign = other_ca.issue("a stranger", server=False)

    assert _liveness(server.target, grpc.ssl_channel_credentials(trust)) == grpc.StatusCode.UNAVAILABLE
    stranger = grpc.ssl_channel_credentials(trust, private_key=foreign.key, certificate_chain=foreign.cert)
    assert _liveness(server.target, stranger) == grpc.StatusCode.UNAVAILABLE
    # A server certificate is not a client certificate (extended key usage).
    server_pair = ca.issue("localhost", server=True)
    wrong_usage = grpc.ssl_channel_credentials(trust, private_key=server_pair.key, certificate_chain=server_pair.cert)
    assert _liveness(server.target, wrong_usage) == grpc.StatusCode.UNAVAILABLE

    member = grpc.ssl_channel_credentials(trust, private_key=good.key, certificate_chain=good.cert)
    assert _liveness(server.target, member) == SERVING
    cert, key = write_pair(tmp_path / "client", good, "client")
    with Client(server.target, root_certificates=tls_files["ca"], client_certificate=cert, client_key=key) as sdk:
        assert len(sdk.classify(photos["china"], model="alexnet", top_k=1)[0]) == 1
    with (
        Client(server.target, root_certificates=tls_files["ca"], retries=0) as sdk,  # no client certificate
        pytest.raises(UnavailableError),
    ):
        sdk.models()


def test_rotated_certificates_are_served_without_a_restart(serve_inprocess, tls_files, ca, caplog) -> None:
    server = _tls_server(serve_inprocess, tls_files, wait_loaded=False)
    old_trust = grpc.ssl_channel_credentials(ca.pem)
    assert _liveness(server.target, old_trust) == SERVING

    # Rotate to a certificate from a new CA, in place, as cert-manager does.
    new_ca = CertificateAuthority("the next CA")
    write_pair(tls_files["cert"].parent, new_ca.issue("localhost", server=True), "server")
    new_trust = grpc.ssl_channel_credentials(new_ca.pem)
    assert _liveness(server.target, new_trust) == SERVING
    assert _liveness(server.target, old_trust) == grpc.StatusCode.UNAVAILABLE

    # A broken rotation (a key that does not belong to the certificate) is not served: the
    # previous certificate keeps working and the log says why.
    write_atomically(tls_files["key"], ca.issue("localhost", server=True).key)
    assert _liveness(server.target, new_trust) == SERVING
    assert "cannot be used" in caplog.text
    write_atomically(tls_files["cert"], b"not a certificate\n")
    assert _liveness(server.target, new_trust) == SERVING

    # Fixed files are picked up again.
    write_pair(tls_files["cert"].parent, ca.issue("localhost", server=True), "server")
    assert _liveness(server.target, old_trust) == SERVING


def _rotations(ca: CertificateAuthority) -> dict[str, Issued]:
    """Rotations that cannot work, by the reason they are refused for."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "expired": ca.issue("localhost", server=True, valid_from=now - datetime.timedelta(days=2),
                            valid_until=now - datetime.timedelta(minutes=1)),
        "not_yet_valid": ca.issue("localhost", server=True, valid_from=now + datetime.timedelta(hours=1),
                                  valid_until=now + datetime.timedelta(days=2)),
        "key_mismatch": Issued(cert=ca.issue("localhost", server=True).cert,
                               key=ca.issue("localhost", server=True).key),
        "malformed": Issued(cert=b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
                            key=ca.issue("localhost", server=True).key),
    }  # fmt: skip


def test_a_rotation_that_cannot_work_is_refused_logged_once_and_counted(tls_files, ca, caplog) -> None:
    """Expired, not yet valid, a foreign key, garbage, a FIFO, /dev/zero: the previous
    certificate keeps serving; each refusal is counted by its reason."""
    refused: list[str] = []
    files = CertificateFiles(TlsFiles(tls_files["cert"], tls_files["key"]), on_rejected=refused.append)
    assert files.fetch() is None  # nothing changed
    directory = tls_files["cert"].parent
    for reason, issued in _rotations(ca).items():
        write_pair(directory, issued, "server")
        assert files.fetch() is None, reason
        assert files.fetch() is None, reason  # the same bad files: not read, logged or counted again
        assert refused[-1] == reason
    assert len(refused) == 4
    assert caplog.text.count("cannot be used") == 4

    fifo = directory / "fifo.crt"
    os.mkfifo(fifo)
    zero = directory / "zero.crt"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        os.replace(path, tls_files["cert"])
        assert files.fetch() is None  # at once: neither waits on the FIFO nor reads /dev/zero
        assert refused[-1] == "not_regular_file"
    big = directory / "big.crt"
    big.write_bytes(b"x" * (MAX_TLS_FILE_BYTES + 1))
    os.replace(big, tls_files["cert"])
    assert files.fetch() is None and refused[-1] == "too_large"

    write_pair(directory, ca.issue("localhost", server=True), "server")
    assert files.fetch() is not None  # a sound rotation is taken


def test_an_expired_certificate_rotated_in_keeps_the_previous_one_serving(serve_inprocess, tls_files, ca) -> None:
    server = _tls_server(serve_inprocess, tls_files, wait_loaded=False)
    trust = grpc.ssl_channel_credentials(ca.pem)
    assert _liveness(server.target, trust) == SERVING
    expired = _rotations(ca)["expired"]
    write_pair(tls_files["cert"].parent, expired, "server")
    assert _liveness(server.target, trust) == SERVING  # a new handshake, with the previous certificate
    assert sample_value(scrape(server.metrics_url), "vision_tls_reload_errors_total", reason="expired") == 1


def test_an_expired_certificate_stops_the_server_at_start_with_a_clear_error(tmp_path, ca) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue("localhost", server=True, valid_from=now - datetime.timedelta(days=2),
                       valid_until=now - datetime.timedelta(days=1))  # fmt: skip
    cert, key = write_pair(tmp_path, expired, "server")
    with pytest.raises(FailedPreconditionError, match="expired"):
        CertificateFiles(TlsFiles(cert, key))


def test_health_port_answers_health_in_plaintext_and_nothing_else(serve_inprocess, tls_files) -> None:
    server = _tls_server(serve_inprocess, tls_files, health_port=0)
    assert server.server is not None
    health_target = f"127.0.0.1:{server.server.health_port}"
    assert server.server.health_port not in (0, server.grpc_port)
    assert _liveness(health_target, None) == SERVING
    with grpc.insecure_channel(health_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == SERVING  # the same story as the main port: models are loaded
        with pytest.raises(grpc.RpcError) as unimplemented:
            infer_grpc.GRPCInferenceServiceStub(channel).ServerLive(infer_pb.ServerLiveRequest(), timeout=10)
        assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cert": True}, "--tls-key-file is missing"),
        ({"key": True}, "--tls-cert-file is missing"),
        ({"client_ca": True}, "needs --tls-cert-file and --tls-key-file"),
    ],
)
def test_incomplete_tls_options_are_refused(tls_files, options, message) -> None:
    with pytest.raises(FailedPreconditionError, match=message):
        TlsFiles.from_options(
            tls_files["cert"] if options.get("cert") else None,
            tls_files["key"] if options.get("key") else None,
            tls_files["ca"] if options.get("client_ca") else None,
        )


def test_unusable_tls_files_stop_the_server_with_a_clear_error(tmp_path, tls_files, ca) -> None:
    mismatched = tmp_path / "other.key"
    mismatched.write_bytes(ca.issue("localhost", server=True).key)
    for cert, key in ((tls_files["cert"], mismatched), (tmp_path / "missing.crt", tls_files["key"])):
        with pytest.raises(FailedPreconditionError, match="cannot use the TLS files"):
            CertificateFiles(TlsFiles(cert, key))
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    with pytest.raises(FailedPreconditionError, match="CA bundle"):
        CertificateFiles(TlsFiles(tls_files["cert"], tls_files["key"], not_pem))


def test_tls_options_from_the_command_line_and_environment(tls_files) -> None:
    from service.cli import build_serve_parser, config_from_args

    env = {
        "VISION_SERVE_TLS_CERT_FILE": str(tls_files["cert"]),
        "VISION_SERVE_TLS_KEY_FILE": str(tls_files["key"]),
        "VISION_SERVE_HEALTH_PORT": "8003",
        "VISION_SERVE_METRICS_HOST": "127.0.0.1",
    }
    config = config_from_args(build_serve_parser(env).parse_args(["--tls-client-ca-file", str(tls_files["ca"])]))
    assert isinstance(config, ServeConfig)
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) == (
        tls_files["cert"], tls_files["key"], tls_files["ca"],
    )  # fmt: skip
    assert config.health_port == 8003 and config.metrics_host == "127.0.0.1"
    with pytest.raises(SystemExit, match="--health-port must differ"):
        config_from_args(build_serve_parser({}).parse_args(["--health-port", "8001"]))
    defaults = config_from_args(build_serve_parser({}).parse_args([]))
    assert defaults.tls_cert_file is None and defaults.health_port is None and defaults.metrics_host is None


# -- the HTTP port: HTTPS from the same files ------------------------------------------------------


def _https_status(port: int, ca: CertificateAuthority, client: Issued | None = None, tmp: Path | None = None):
    """GET /v2/health/live over a new HTTPS connection: (status, the server certificate's serial)."""
    import http.client
    import ssl

    from cryptography import x509

    context = ssl.create_default_context(cadata=ca.pem.decode())
    if client is not None:
        assert tmp is not None
        cert, key = write_pair(tmp / "client", client, "client")
        context.load_cert_chain(cert, key)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request("GET", "/v2/health/live")
        status = connection.getresponse().status
        der = connection.sock.getpeercert(binary_form=True)
        return status, x509.load_der_x509_certificate(der).serial_number
    finally:
        connection.close()


def test_the_http_port_speaks_tls_from_the_same_files_and_follows_their_rotation(
    serve_inprocess, tls_files, ca, tmp_path
) -> None:
    import http.client
    import ssl

    from cryptography import x509

    server = _tls_server(serve_inprocess, tls_files)
    port = server.server.http_port
    status, first = _https_status(port, ca)
    assert status == 200 and first == x509.load_pem_x509_certificate(tls_files["cert"].read_bytes()).serial_number
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):  # plaintext is not served
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        plain.request("GET", "/v2/health/live")
        plain.getresponse()
    renewed = ca.issue("localhost", server=True)
    write_pair(tls_files["cert"].parent, renewed, "server")
    status, second = _https_status(port, ca)  # a new connection takes the new certificate
    assert status == 200 and second == x509.load_pem_x509_certificate(renewed.cert).serial_number != first
    # An expired one rotated in is refused: the renewed certificate keeps serving.
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue("localhost", server=True, valid_from=now - datetime.timedelta(days=2),
                       valid_until=now - datetime.timedelta(days=1))  # fmt: skip
    write_pair(tls_files["cert"].parent, expired, "server")
    assert _https_status(port, ca) == (200, second)


def test_mutual_tls_on_the_http_port(serve_inprocess, tls_files, ca, other_ca, tmp_path) -> None:
    import ssl

    server = _tls_server(serve_inprocess, tls_files, mutual=True)
    port = server.server.http_port
    assert _https_status(port, ca, ca.issue("client", server=False), tmp_path)[0] == 200
    for client in (None, other_ca.issue("stranger", server=False)):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _https_status(port, ca, client, tmp_path)
    assert _https_status(port, ca, ca.issue("client", server=False), tmp_path)[0] == 200  # still serving
