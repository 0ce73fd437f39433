"""The hop's engine end against a front end that breaks its rules: one that stops reading its
answers, one that names memory outside its arena, one whose arena could shrink. Each is a raw
peer on the engine's hop socket of a real ``--frontends 2`` server, speaking the hop's own
messages (``service.inference.hop``); the real front ends keep serving real clients meanwhile. And a real
front end stopped outright (SIGSTOP) stalls its own clients only.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from service.engine.hop_server import UNSENT_BYTES
from service.inference import hop
from tests.conftest import ServerProcess, start_server
from tests.metrics_util import sample_value, scrape
from tests.test_frontends import CONNECTIONS, OWN_CONNECTION, children, wait_for

pytestmark = pytest.mark.e2e

MODEL = "tiny"
PEER = 7  # the stalled peer's front-end number: none of the real ones


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("hop-limits"), "--frontends", "2", "--models", MODEL, "--weights", "random"
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        assert proc.stop() == 0
        proc.assert_no_traceback()


def hop_socket(server: ServerProcess) -> Path:
    """The engine's hop socket, in the run directory its command line names."""
    pid = children(server)["engine"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(cmdline[cmdline.index(b"service.engine") + 1].decode()) / hop.HOP_SOCKET


def connect(server: ServerProcess, arena: hop.Arena, *, arena_fd: int | None = None) -> socket.socket:
    """A peer that has said hello as front end ``PEER``, with a small receive buffer (it reads nothing)."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.settimeout(60)
    peer.connect(str(hop_socket(server)))
    hello = hop.Hello(PEER, os.getpid(), arena.size)
    socket.send_fds(peer, [hello.encode()], [arena.fd if arena_fd is None else arena_fd])
    return peer


def links_closed(server: ServerProcess, reason: str) -> float:
    return sample_value(scrape(server.metrics_url), "vision_hop_links_closed_total", reason=reason)


def serve_everywhere(server: ServerProcess) -> None:
    """Inference through both real front ends (enough connections that each serves some)."""
    for _ in range(CONNECTIONS):
        assert serve_once(server) == (1, 1000)


def ended(peer: socket.socket) -> bool:
    """Whether the engine ended the peer's connection: what it still holds is read, then the end."""
    try:
        while peer.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_frontend_that_stops_reading_is_cut_off_and_the_others_keep_serving(server):
    engine = children(server)["engine"]
    arena = hop.Arena(1 << 20)
    peer = connect(server, arena)
    describe = b"".join(hop.frame(hop.Describe(i, MODEL).encode()) for i in range(1000))
    answer = len(hop.frame(hop.Reply(0, inline=b"x" * 100).encode()))  # a description is at least this
    most = 4 * UNSENT_BYTES // answer  # well past the budget: the engine must have cut the link by then
    sent = 0
    try:
        while sent < most:
            peer.sendall(describe)  # answered by the engine, never read here
            sent += 1000
            if sent == 10_000:  # while this peer stalls, the real front ends serve as ever
                serve_everywhere(server)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < most, "the engine kept answering a front end that reads nothing"
    assert ended(peer)
    peer.close()
    arena.close()
    assert "closing the link of front end 7" in server.log() and "stopped reading its answers" in server.log()
    assert links_closed(server, "unread_answers") == 1
    serve_everywhere(server)
    assert children(server)["engine"] == engine


def test_a_stopped_frontend_stalls_only_its_own_clients(server):
    """A real front end stopped (SIGSTOP) with connections of its own: the other front end serves
    meanwhile, and once it runs again its clients are answered too."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_frontends import frontend_counts

    pids = children(server)
    served_before = frontend_counts(server).get("1", 0.0)
    os.kill(pids["frontend 0"], signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            answers = [pool.submit(serve_once, server) for _ in range(CONNECTIONS)]
            wait_for(lambda: frontend_counts(server).get("1", 0.0) > served_before)
            os.kill(pids["frontend 0"], signal.SIGCONT)
            assert [answer.result() for answer in answers] == [(1, 1000)] * CONNECTIONS
    finally:
        os.kill(pids["frontend 0"], signal.SIGCONT)
    assert children(server) == pids


def serve_once(server: ServerProcess) -> tuple[int, ...]:
    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    client = triton.InferenceServerClient(server.target, channel_args=OWN_CONNECTION)
    try:
        tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        return tuple(client.infer(MODEL, [tensor], client_timeout=120).as_numpy("LOGITS").shape)
    finally:
        client.close()


def test_a_descriptor_outside_the_arena_ends_that_link_only(server):
    arena = hop.Arena(1 << 20)
    peer = connect(server, arena)
    outside = hop.Infer(1, arena.size - hop.PAGE, 10, 2 * hop.PAGE, 30.0, True, "grpc", "ModelInfer")
    peer.sendall(hop.frame(outside.encode()))
    assert ended(peer)
    peer.close()
    arena.close()
    wait_for(lambda: "outside its arena" in server.log())
    assert links_closed(server, "bad_descriptor") == 1
    serve_everywhere(server)


def test_an_arena_that_could_shrink_is_refused(server):
    arena = hop.Arena(1 << 20)
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, arena.size)
    try:
        peer = connect(server, arena, arena_fd=unsealed)
        assert ended(peer)
        peer.close()
    finally:
        os.close(unsealed)
        arena.close()
    wait_for(lambda: "not sealed against shrinking" in server.log())
    assert links_closed(server, "bad_hello") == 1
    serve_everywhere(server)
