"""Who may call what: the scope table, the loopback rule, tokens (several, re-read), --auth-scope.

The rule itself (``AccessPolicy``, ``is_loopback_peer``) is tested as pure functions with peer
strings of every kind, since tests can only reach servers over loopback; the server tests
show the same rule end to end on a real server.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import ServeConfig
from service.errors import AuthenticationError, FailedPreconditionError, PermissionDeniedError
from service.transport.auth import (
    ALL_SCOPES,
    RPC_SCOPES,
    AccessPolicy,
    Scope,
    TokenFile,
    bearer_token,
    is_loopback_peer,
    parse_tokens,
    policy_from,
    scope_of,
)
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as infer_grpc
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc
from vision_client.protocol.stubs.vision.v1 import models_pb2

TOKEN_A = "a-first-token-0123456789abcdef"
TOKEN_B = "b-second-token-0123456789abcdef"

# -- the scope table -------------------------------------------------------------------------


def _methods(file_descriptor, service: str) -> set[str]:
    described = file_descriptor.services_by_name[service]
    return {f"/{described.full_name}/{method.name}" for method in described.methods}


def test_every_method_the_server_exposes_has_a_scope() -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    exposed = (
        _methods(infer_pb.DESCRIPTOR, "GRPCInferenceService")
        | _methods(models_pb2.DESCRIPTOR, "Models")
        | _methods(ft_pb.DESCRIPTOR, "FineTuning")
        | _methods(health_pb2.DESCRIPTOR, "Health")
        | _methods(reflection_pb2.DESCRIPTOR, "ServerReflection")
    )
    missing = exposed - set(RPC_SCOPES)
    assert not missing, f"give these RPCs a scope in service/transport/auth.py RPC_SCOPES: {sorted(missing)}"


def test_every_rest_route_stands_for_a_method_of_the_scope_table() -> None:
    """The HTTP port authorizes a route by the gRPC method it names: a name the table lacks would
    fall to the management scope unseen, and a method without a route is a gap in the binding."""
    from typing import Any, cast

    from service.transport.rest.routes import routes
    from service.transport.rest.vision_routes import vision_routes

    table = routes(cast(Any, None)) + vision_routes(
        cast(Any, None), cast(Any, None), max_part_bytes=1, read_timeout_s=1.0
    )
    named = {route.rpc for route in table}
    assert not named - set(RPC_SCOPES), sorted(named - set(RPC_SCOPES))
    served = _methods(infer_pb.DESCRIPTOR, "GRPCInferenceService") | _methods(models_pb2.DESCRIPTOR, "Models")
    served |= _methods(ft_pb.DESCRIPTOR, "FineTuning")
    streaming_only = {"/inference.GRPCInferenceService/ModelStreamInfer"}  # no REST form in KServe's spec
    assert served - named == streaming_only


def test_management_is_fine_tuning_and_model_load_unload() -> None:
    management = {method for method, scope in RPC_SCOPES.items() if scope is Scope.MANAGEMENT}
    assert management == _methods(ft_pb.DESCRIPTOR, "FineTuning") | {
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        "/inference.GRPCInferenceService/TraceSetting",
        "/vision.v1.Models/RollbackModel",  # changes what every replica serves, as a publish does
    }
    assert "/vision.v1.FineTuning/DeleteModel" in management
    assert {m for m, s in RPC_SCOPES.items() if s is Scope.OPEN} == {
        "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List",
    }  # fmt: skip
    assert scope_of("/inference.GRPCInferenceService/ModelInfer") is Scope.INFERENCE
    assert scope_of("/inference.GRPCInferenceService/ModelStreamInfer") is Scope.INFERENCE


def test_system_shared_memory_is_its_own_scope_from_this_host_only(tmp_path: Path) -> None:
    host = {method for method, scope in RPC_SCOPES.items() if scope is Scope.SHARED_MEMORY}
    assert host == {
        f"/inference.GRPCInferenceService/SystemSharedMemory{call}" for call in ("Status", "Register", "Unregister")
    }
    open_policy = AccessPolicy(None)
    open_policy.check(Scope.SHARED_MEMORY, [], "ipv4:127.0.0.1:5")
    with pytest.raises(PermissionDeniedError, match="this host only"):
        open_policy.check(Scope.SHARED_MEMORY, [], "ipv4:10.0.0.5:1")
    (tmp_path / "tokens").write_text(f"{TOKEN_A}\n")
    policy = AccessPolicy(TokenFile(tmp_path / "tokens"))
    policy.check(Scope.SHARED_MEMORY, [f"Bearer {TOKEN_A}"], "ipv6:[::1]:5")
    with pytest.raises(AuthenticationError):
        policy.check(Scope.SHARED_MEMORY, [], "ipv4:127.0.0.1:5")
    with pytest.raises(PermissionDeniedError, match="this host only"):  # a token does not make a peer local
        policy.check(Scope.SHARED_MEMORY, [f"Bearer {TOKEN_A}"], "ipv4:10.0.0.5:1")


@pytest.mark.parametrize(
    "method",
    ["/inference.GRPCInferenceService/CudaSharedMemoryRegister", "/vision.v2.Anything/New", "", "garbage"],
)
def test_unknown_methods_get_the_stricter_scope(method: str) -> None:
    assert scope_of(method) is Scope.MANAGEMENT


# -- the loopback rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:50000", True),
        ("ipv4:127.0.0.2:1", True),  # all of 127.0.0.0/8
        ("ipv4:127.255.255.254:1", True),
        ("ipv6:[::1]:5", True),
        ("ipv6:%5B::1%5D:36950", True),  # how grpcio 1.81 writes it
        ("ipv6:[::ffff:127.0.0.1]:5", True),  # IPv4-mapped loopback
        ("ipv6:%5B::ffff:127.0.0.9%5D:5", True),
        ("unix:/run/vision.sock", True),
        ("unix:", True),
        ("unix-abstract:vision", True),
        ("ipv4:10.0.0.5:1234", False),
        ("ipv4:192.168.1.20:443", False),
        ("ipv4:0.0.0.0:1", False),
        ("ipv4:128.0.0.1:1", False),
        ("ipv6:[::ffff:10.0.0.5]:5", False),  # IPv4-mapped, not loopback
        ("ipv6:[2001:db8::1]:5", False),
        ("ipv6:[::]:5", False),
        ("ipv6:[fe80::1%25eth0]:5", False),
        ("ipv6:[::1:5", False),  # no closing bracket
        ("ipv4:localhost:5", False),  # names are not addresses
        ("ipv4:", False),
        ("127.0.0.1:5", False),  # no scheme: not a gRPC peer string
        ("vsock:3:5", False),
        ("", False),
    ],
)
def test_the_peer_rule(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


def test_without_a_token_management_is_refused_to_other_hosts_with_a_how_to() -> None:
    policy = AccessPolicy(tokens=None)
    management = "/vision.v1.FineTuning/DeleteModel"
    policy.check(scope_of(management), [], "ipv4:127.0.0.1:4000")
    policy.check(scope_of(management), [], "ipv6:%5B::1%5D:4000")
    for peer in ("ipv4:10.0.0.5:1234", "ipv6:[::ffff:10.0.0.5]:1", "ipv6:[2001:db8::7]:9"):
        with pytest.raises(PermissionDeniedError) as refused:
            policy.check(Scope.MANAGEMENT, [], peer)
        assert "--auth-token-file" in refused.value.message and "authorization: Bearer" in refused.value.message
        policy.check(Scope.INFERENCE, [], peer)  # inference stays open
        policy.check(Scope.OPEN, [], peer)
    # A token does not help when the server has none to compare it with.
    with pytest.raises(PermissionDeniedError):
        policy.check(Scope.MANAGEMENT, ["Bearer anything"], "ipv4:10.0.0.5:1")


def test_with_a_token_loopback_is_no_exemption(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A}\n")
    policy = AccessPolicy(TokenFile(path))
    for peer in ("ipv4:127.0.0.1:1", "ipv4:10.0.0.5:1"):
        with pytest.raises(AuthenticationError, match="needs 'authorization: Bearer <token>'"):
            policy.check(Scope.MANAGEMENT, [], peer)
        with pytest.raises(AuthenticationError, match="not valid"):
            policy.check(Scope.MANAGEMENT, ["Bearer nope"], peer)
        policy.check(Scope.MANAGEMENT, [f"Bearer {TOKEN_A}"], peer)
        policy.check(Scope.INFERENCE, [], peer)  # --auth-scope management
    protect_all = AccessPolicy(TokenFile(path), protect_inference=True)
    with pytest.raises(AuthenticationError):
        protect_all.check(Scope.INFERENCE, [], "ipv4:127.0.0.1:1")
    protect_all.check(Scope.OPEN, [], "ipv4:10.0.0.5:1")


@pytest.mark.parametrize(
    ("values", "token"),
    [
        (["Bearer abc"], "abc"),
        (["bearer abc"], "abc"),  # RFC 6750: the scheme is case-insensitive
        (["  Bearer   abc  "], "abc"),
        (["Basic abc"], None),
        (["Bearer"], None),
        (["Bearer "], None),
        (["abc"], None),
        ([], None),
        (["Bearer abc", "Bearer def"], None),  # one, and only one
    ],
)
def test_bearer_header_parsing(values: list[str], token: str | None) -> None:
    assert bearer_token(values) == token


# -- the token file --------------------------------------------------------------------------


def test_token_file_lines_comments_and_blank_lines() -> None:
    grants = parse_tokens("# rotated 2026-11\n\n  tok-1  \ntok-2\r\n   # old one removed\n")
    assert [grant.token for grant in grants] == ["tok-1", "tok-2"]
    assert all(grant.scopes == ALL_SCOPES for grant in grants)  # a bare token: every scope, as before
    assert parse_tokens("\n \n# only comments\n") == ()


def test_token_file_must_hold_a_token_at_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    with pytest.raises(FailedPreconditionError, match="cannot read --auth-token-file"):
        TokenFile(path)
    path.write_text("# nothing yet\n\n")
    with pytest.raises(FailedPreconditionError, match="holds no token"):
        TokenFile(path)


def test_token_file_changes_apply_at_once_and_a_lost_file_refuses_everything(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A}\n")
    tokens = TokenFile(path)
    assert tokens.accepts(TOKEN_A) and not tokens.accepts(TOKEN_B)
    path.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    assert tokens.accepts(TOKEN_A) and tokens.accepts(TOKEN_B)
    path.write_text(f"{TOKEN_B}\n")
    assert not tokens.accepts(TOKEN_A) and tokens.accepts(TOKEN_B)
    assert not tokens.accepts(TOKEN_B[:-1]) and not tokens.accepts(TOKEN_B + "x") and not tokens.accepts("")
    path.unlink()
    assert not tokens.accepts(TOKEN_B)  # fail closed
    path.write_text(f"{TOKEN_A}\n")
    assert tokens.accepts(TOKEN_A)
    path.write_text("\n")
    assert not tokens.accepts(TOKEN_A)


def test_auth_scope_all_needs_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match=r"--auth-scope all .* --auth-token-file"):
        policy_from(None, "all")
    from service.cli import build_serve_parser, config_from_args

    with pytest.raises(SystemExit):
        config_from_args(build_serve_parser({"VISION_SERVE_AUTH_SCOPE": "everything"}).parse_args([]))
    assert config_from_args(build_serve_parser({}).parse_args([])).auth_scope == "management"
    assert ServeConfig().auth_scope == "management"


# -- on a real server ------------------------------------------------------------------------


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_auth_scope_all_and_two_tokens_rotated_without_a_restart(serve_inprocess, tmp_path: Path, photos) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    server = serve_inprocess(auth_token_file=tokens, auth_scope="all")
    with grpc.insecure_channel(server.target) as channel:
        infer = infer_grpc.GRPCInferenceServiceStub(channel)
        jobs = ft_grpc.FineTuningStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def live(token: str | None) -> grpc.StatusCode:
            return _code(lambda: infer.ServerLive(infer_pb.ServerLiveRequest(), metadata=_auth(token), timeout=10))

        def classify(token: str | None) -> grpc.StatusCode:
            request = infer_pb.ModelInferRequest(model_name="alexnet")
            tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(photos["china"])
            return _code(lambda: infer.ModelInfer(request, metadata=_auth(token), timeout=60))

        def list_jobs(token: str | None) -> grpc.StatusCode:
            return _code(lambda: jobs.ListJobs(ft_pb.ListJobsRequest(), metadata=_auth(token), timeout=10))

        for call in (live, classify, list_jobs):
            assert call(None) == grpc.StatusCode.UNAUTHENTICATED, call.__name__
            assert call("wrong") == grpc.StatusCode.UNAUTHENTICATED, call.__name__
            assert call(TOKEN_A) == grpc.StatusCode.OK, call.__name__
            assert call(TOKEN_B) == grpc.StatusCode.OK, call.__name__
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)  # no token
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        with pytest.raises(grpc.RpcError) as missing:
            infer.ServerLive(infer_pb.ServerLiveRequest(), timeout=10)
        assert "authorization: Bearer" in missing.value.details()

        # Roll out B, retire A: no restart.
        tokens.write_text(f"{TOKEN_B}\n")
        assert live(TOKEN_A) == grpc.StatusCode.UNAUTHENTICATED
        assert list_jobs(TOKEN_A) == grpc.StatusCode.UNAUTHENTICATED
        assert live(TOKEN_B) == grpc.StatusCode.OK
        assert classify(TOKEN_B) == grpc.StatusCode.OK


def test_without_a_token_loopback_manages_and_inference_is_open(serve_inprocess) -> None:
    server = serve_inprocess(wait_loaded=False)
    with grpc.insecure_channel(server.target) as channel:
        reply = ft_grpc.FineTuningStub(channel).ListJobs(ft_pb.ListJobsRequest(), timeout=10)
        assert list(reply.jobs) == []
        assert infer_grpc.GRPCInferenceServiceStub(channel).ServerLive(infer_pb.ServerLiveRequest(), timeout=10).live


def test_a_token_server_refuses_unknown_methods_before_saying_unimplemented(serve_inprocess, tmp_path) -> None:
    """An unregistered method is UNIMPLEMENTED for everyone: nothing to protect, nothing revealed."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n")
    server = serve_inprocess(auth_token_file=tokens, wait_loaded=False)
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/vision.v1.FineTuning/Nope")
        with pytest.raises(grpc.RpcError) as error:
            call(b"", timeout=10)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        delete = ft_grpc.FineTuningStub(channel).DeleteModel
        assert _code(lambda: delete(ft_pb.DeleteModelRequest(name="x"), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


# -- tokens with scopes ----------------------------------------------------------------------


def test_a_token_line_may_carry_its_scopes() -> None:
    grants = parse_tokens(
        f"{TOKEN_A} scopes=inference\n{TOKEN_B}\tscopes=management,shared-memory\nc-token-0123456789abcdef\n"
    )
    assert [(g.token, g.scopes) for g in grants] == [
        (TOKEN_A, frozenset({Scope.INFERENCE})),
        (TOKEN_B, frozenset({Scope.MANAGEMENT, Scope.SHARED_MEMORY})),
        ("c-token-0123456789abcdef", ALL_SCOPES),
    ]
    assert [g.token for g in parse_tokens("ab#cd\n")] == ["ab#cd"]  # '#' inside a token is the token's


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("secret-part-one secret-part-two\n", "line 1: more than a token and its scopes="),  # a token with a space
        ("# c\nsecret-token # a comment\n", "line 2: more than a token and its scopes="),
        ("secret-token scopes=inference scopes=management\n", "line 1: more than a token"),
        ("secret-token scopes=admin\n", "line 1: unknown scope 'admin'"),
        ("secret-token scopes=\n", "line 1: unknown scope ''"),
        ("secret-token scopes=inference,,management\n", "line 1: unknown scope ''"),
        ("ok-token\nsecret-token\nsecret-token scopes=inference\n", "line 3: the same token as line 2"),
        ("s\u00e9cret-token\n", "line 1: the token holds a character that is not printable ASCII"),
    ],
)
def test_a_bad_token_line_is_named_by_its_number_and_never_quoted(text: str, problem: str) -> None:
    from service.transport.auth import TokenFileError

    with pytest.raises(TokenFileError) as refused:
        parse_tokens(text)
    assert problem in str(refused.value)
    assert "secret" not in str(refused.value) and "cret" not in str(refused.value)


def test_a_bad_line_fails_the_start_and_a_reload_refuses_every_token(tmp_path: Path, caplog) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A}\n{TOKEN_B} scopes=everything\n")
    with pytest.raises(FailedPreconditionError, match="line 2: unknown scope") as refused:
        TokenFile(path)
    assert TOKEN_B not in refused.value.message and "scopes=inference,management,shared-memory" in refused.value.message
    path.write_text(f"{TOKEN_A} scopes=inference\n")
    tokens = TokenFile(path)
    assert tokens.accepts(TOKEN_A) and tokens.scopes_of(TOKEN_A) == {Scope.INFERENCE}
    path.write_text(f"{TOKEN_A}\n{TOKEN_B} trailing words\n")
    assert not tokens.accepts(TOKEN_A)  # fail closed until fixed
    assert "line 2: more than a token" in caplog.text and TOKEN_B not in caplog.text
    path.write_text(f"{TOKEN_A}\n{TOKEN_B} scopes=management\n")
    assert tokens.scopes_of(TOKEN_A) is None  # scopes_of alone does not re-read
    assert tokens.accepts(TOKEN_A) and tokens.scopes_of(TOKEN_B) == {Scope.MANAGEMENT}


def test_a_token_without_the_scope_is_permission_denied_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A} scopes=inference\n{TOKEN_B} scopes=management\n")
    policy = AccessPolicy(TokenFile(path), protect_inference=True)
    for peer in ("ipv4:127.0.0.1:1", "ipv4:10.0.0.5:1"):
        policy.check(Scope.INFERENCE, [f"Bearer {TOKEN_A}"], peer)
        policy.check(Scope.MANAGEMENT, [f"Bearer {TOKEN_B}"], peer)
        with pytest.raises(PermissionDeniedError, match="lacks the 'management' scope") as refused:
            policy.check(Scope.MANAGEMENT, [f"Bearer {TOKEN_A}"], peer)
        assert "its scopes: inference" in refused.value.message and TOKEN_A not in refused.value.message
        with pytest.raises(PermissionDeniedError, match="lacks the 'inference' scope"):
            policy.check(Scope.INFERENCE, [f"Bearer {TOKEN_B}"], peer)
    with pytest.raises(PermissionDeniedError, match="lacks the 'shared-memory' scope"):
        policy.check(Scope.SHARED_MEMORY, [f"Bearer {TOKEN_B}"], "ipv4:127.0.0.1:1")
    with pytest.raises(AuthenticationError):  # a wrong token stays UNAUTHENTICATED
        policy.check(Scope.MANAGEMENT, ["Bearer wrong"], "ipv4:127.0.0.1:1")


# -- this host, and pages of other sites ---------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ours"),
    [
        ("127.0.0.1:8000", True),
        ("127.0.0.1", True),
        ("[::1]:8000", True),
        ("10.1.2.3:8000", True),  # an IP literal is never rebound
        ("localhost:8000", True),
        ("LOCALHOST.:8000", True),
        ("vision.localhost", True),
        ("myhost:8000", True),  # one label: /etc/hosts or the local resolver, not public DNS
        ("attacker.example:8000", False),
        ("127.0.0.1.nip.io:8000", False),
        ("localhost.attacker.example", False),
        ("vision.internal:8000", False),  # until --allowed-hosts names it
        ("", False),
        ("[::1", False),
        ("a.b:port", False),
        (":8000", False),
    ],
)
def test_which_host_headers_name_this_host(host: str, ours: bool) -> None:
    from service.transport.auth import names_this_host

    assert names_this_host(host) is ours
    malformed = host in ("", "[::1", "a.b:port", ":8000")
    assert names_this_host(host, ["*"]) is not malformed  # "*": any name at all, never a malformed Host


def test_allowed_hosts_add_names() -> None:
    policy = policy_from(None, "management", ["Vision.Internal.", " "])
    assert policy.allowed_hosts == {"vision.internal"}
    assert policy.names_this_host("vision.internal:8000") and policy.names_this_host("VISION.internal")
    assert not policy.names_this_host("other.internal:8000")


def test_without_a_token_a_loopback_peer_naming_another_host_does_not_manage() -> None:
    policy = AccessPolicy(None, allowed_hosts=frozenset({"vision.internal"}))
    loopback = "ipv4:127.0.0.1:4000"
    for scope in (Scope.MANAGEMENT, Scope.SHARED_MEMORY):
        policy.check(scope, [], loopback, "127.0.0.1:8000")
        policy.check(scope, [], loopback, "vision.internal:8000")
        policy.check(scope, [], loopback)  # gRPC: no Host to check
        with pytest.raises(PermissionDeniedError, match="does not name this server") as refused:
            policy.check(scope, [], loopback, "rebind.attacker.example:8000")
        assert "--allowed-hosts" in refused.value.message
    assert not policy.is_local(loopback, "rebind.attacker.example") and policy.is_local(loopback, "localhost")
    policy.check(Scope.INFERENCE, [], loopback, "rebind.attacker.example")  # open: nothing to grant


def test_with_a_token_the_token_decides_whatever_the_host(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A}\n")
    policy = AccessPolicy(TokenFile(path))
    policy.check(Scope.MANAGEMENT, [f"Bearer {TOKEN_A}"], "ipv4:127.0.0.1:1", "vision.example.com")  # a sidecar
    with pytest.raises(PermissionDeniedError, match="does not name this server"):  # regions: this host only
        policy.check(Scope.SHARED_MEMORY, [f"Bearer {TOKEN_A}"], "ipv4:127.0.0.1:1", "vision.example.com")


@pytest.mark.parametrize(
    ("method", "origins", "fetch_site", "host", "foreign"),
    [
        ("POST", [], None, "127.0.0.1:8000", False),  # curl, tritonclient, the SDK
        ("POST", ["http://127.0.0.1:8000"], "same-origin", "127.0.0.1:8000", False),  # the console
        ("DELETE", ["http://localhost:8000"], None, "localhost:8000", False),
        ("POST", ["https://vision.example.com"], None, "vision.example.com", False),  # behind TLS ingress
        ("POST", ["https://vision.example.com"], None, "vision.example.com:443", False),
        ("POST", ["http://[::1]:8000"], None, "[::1]:8000", False),
        ("POST", [], "none", "127.0.0.1:8000", False),  # typed in the address bar
        ("POST", ["http://127.0.0.1:9999"], None, "127.0.0.1:8000", True),  # another port is another origin
        ("POST", ["http://evil.example"], None, "127.0.0.1:8000", True),
        ("POST", ["null"], None, "127.0.0.1:8000", True),  # sandboxed frames, file: pages
        ("POST", ["http://127.0.0.1:8000", "http://evil.example"], None, "127.0.0.1:8000", True),
        ("POST", ["http://user@127.0.0.1:8000"], None, "127.0.0.1:8000", True),
        ("POST", ["ftp://127.0.0.1:8000"], None, "127.0.0.1:8000", True),
        ("POST", [], "cross-site", "127.0.0.1:8000", True),  # no Origin, but the browser says so
        ("POST", [], "same-site", "127.0.0.1:8000", True),  # another port of the same host
        ("DELETE", ["http://127.0.0.1:8000"], "cross-site", "127.0.0.1:8000", True),
        ("GET", ["http://evil.example"], "cross-site", "127.0.0.1:8000", False),  # reads: not readable anyway
        ("HEAD", [], "cross-site", "127.0.0.1:8000", False),
        ("OPTIONS", ["null"], "cross-site", "127.0.0.1:8000", False),
    ],
)
def test_cross_site_evidence(method: str, origins: list[str], fetch_site: str | None, host: str, foreign: bool) -> None:
    from service.transport.auth import cross_site

    assert (cross_site(method, origins, fetch_site, host) is not None) is foreign


def test_scoped_tokens_on_both_ports(serve_inprocess, tmp_path: Path) -> None:
    import http.client
    import json

    tokens = tmp_path / "tokens"
    tokens.write_text(f"# inference only\n{TOKEN_A} scopes=inference\n{TOKEN_B} scopes=management\n")
    server = serve_inprocess(auth_token_file=tokens, auth_scope="all", wait_loaded=False)

    def rest(method: str, path: str, token: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
        try:
            connection.request(method, path, body=b"{}", headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}").get("error", "")
        finally:
            connection.close()

    with grpc.insecure_channel(server.target) as channel:
        infer = infer_grpc.GRPCInferenceServiceStub(channel)
        jobs = ft_grpc.FineTuningStub(channel)

        def refusal(call) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as error:
                call()
            return error.value.code(), error.value.details()

        assert infer.ServerLive(infer_pb.ServerLiveRequest(), metadata=_auth(TOKEN_A), timeout=10).live
        assert list(jobs.ListJobs(ft_pb.ListJobsRequest(), metadata=_auth(TOKEN_B), timeout=10).jobs) == []
        code, details = refusal(lambda: jobs.ListJobs(ft_pb.ListJobsRequest(), metadata=_auth(TOKEN_A), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "lacks the 'management' scope" in details
        code, details = refusal(
            lambda: infer.ServerLive(infer_pb.ServerLiveRequest(), metadata=_auth(TOKEN_B), timeout=10)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "lacks the 'inference' scope" in details
        status_request = infer_pb.SystemSharedMemoryStatusRequest()
        code, details = refusal(
            lambda: infer.SystemSharedMemoryStatus(status_request, metadata=_auth(TOKEN_B), timeout=10)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "lacks the 'shared-memory' scope" in details
        code, _ = refusal(lambda: jobs.ListJobs(ft_pb.ListJobsRequest(), metadata=_auth("wrong"), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED

    assert rest("GET", "/v2/health/live", TOKEN_A)[0] == 200
    assert rest("GET", "/v1/jobs", TOKEN_B)[0] == 200
    status, error = rest("POST", "/v2/repository/models/alexnet/unload", TOKEN_A)
    assert status == 403 and "lacks the 'management' scope" in error
    status, error = rest("GET", "/v2/health/live", TOKEN_B)
    assert status == 403 and "lacks the 'inference' scope" in error
    status, error = rest("GET", "/v2/systemsharedmemory/status", TOKEN_B)
    assert status == 403 and "lacks the 'shared-memory' scope" in error
    assert rest("GET", "/v1/jobs", "wrong")[0] == 401
    # Scopes change with the file, without a restart.
    tokens.write_text(f"{TOKEN_A} scopes=inference,management\n")
    assert rest("GET", "/v1/jobs", TOKEN_A)[0] == 200
    assert rest("GET", "/v1/jobs", TOKEN_B)[0] == 401
