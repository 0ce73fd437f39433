"""Every file the server reads goes through one bounded reader (service/host/files.py): a FIFO, a
device, a directory or an oversized file in place of a runtime cache entry, a token file, a
weights file or a store file is refused at once, never read whole and never waited on.
(TLS files: tests/test_tls.py; the model store: tests/test_store_entries.py.)"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from service.errors import WeightsUnavailableError
from service.host.files import MAX_CACHE_ENTRY_BYTES, FileRefused, open_regular, read_bounded
from service.models import WeightsSource, build_model, get_model_spec
from service.runtimes.export import ENTRY_FILE, MODEL_FILE, WEIGHTS_FILE, ExportCache
from service.transport.auth import TokenFile
from tests.tiny import TINY, TinyNet
from vision_client.protocol.stubs.inference import grpc_service_pb2 as infer_pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as infer_grpc

TOKEN = "a-token-0123456789abcdef0123456789"


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def dev_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def directory(path: Path) -> Path:
    path.mkdir()
    return path


HOSTILE: dict[str, Callable[[Path], Path]] = {"fifo": fifo, "dev_zero": dev_zero, "directory": directory}


def within(seconds: float, function: Callable[[], object]) -> object:
    """``function()``'s result, failing the test if it has not returned after ``seconds``
    (it would otherwise hang the suite: a FIFO opened for reading waits for a writer)."""
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, function()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{function} did not return within {seconds}s"
    returned, value = outcome[0]
    if not returned:
        assert isinstance(value, BaseException)
        raise value
    return value


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("follow", [False, True])
def test_the_reader_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str, follow: bool) -> None:
    path = HOSTILE[kind](tmp_path / "file")
    with pytest.raises(FileRefused) as refused:
        within(10, lambda: read_bounded(path, 1024, follow_symlinks=follow))
    assert refused.value.reason in ("not_regular_file", "unreadable")


def test_symlinks_are_followed_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_bounded(link, 1024, follow_symlinks=True) == b"data"
    with pytest.raises(FileRefused):
        read_bounded(link, 1024)


def test_sizes_are_capped_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 2048)
    with pytest.raises(FileRefused) as refused:
        read_bounded(path, 1024)
    assert refused.value.reason == "too_large"
    with open_regular(path, 4096) as file:
        assert len(file.read()) == 2048


# -- the runtime cache ---------------------------------------------------------------------------


def cache_entry(tmp_path: Path) -> tuple[ExportCache, Path]:
    """A cache and an entry holding every file (their contents do not matter here)."""
    cache = ExportCache(tmp_path)
    entry = cache.entry("tiny", "0" * 64)
    entry.mkdir(parents=True)
    for name in (ENTRY_FILE, MODEL_FILE, WEIGHTS_FILE):
        (entry / name).write_text("{}")
    return cache, entry


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("name", [ENTRY_FILE, MODEL_FILE, WEIGHTS_FILE])
def test_a_cache_entry_holding_something_else_is_unusable_at_once(tmp_path: Path, kind: str, name: str) -> None:
    cache, entry = cache_entry(tmp_path)
    (entry / name).unlink()
    HOSTILE[kind](entry / name)
    problem = within(10, lambda: cache.check(entry))
    assert isinstance(problem, str) and problem


def test_an_oversized_cache_entry_file_is_unusable_without_being_read(tmp_path: Path) -> None:
    cache, entry = cache_entry(tmp_path)
    (entry / ENTRY_FILE).write_bytes(b" " * (MAX_CACHE_ENTRY_BYTES + 1))
    problem = cache.check(entry)
    assert isinstance(problem, str) and "over the limit" in problem


# -- the token file ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_token_file_replaced_by_something_else_refuses_every_token_at_once(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    tokens = TokenFile(path)
    assert tokens.accepts(TOKEN)
    path.unlink()
    HOSTILE[kind](path)
    assert within(10, lambda: tokens.accepts(TOKEN)) is False  # fail closed, without waiting
    path.unlink() if not path.is_dir() else path.rmdir()
    path.write_text(f"{TOKEN}\n")
    assert tokens.accepts(TOKEN)


def test_a_fifo_token_file_at_start_is_a_clear_error(tmp_path: Path) -> None:
    from service.errors import FailedPreconditionError

    path = fifo(tmp_path / "tokens")
    with pytest.raises(FailedPreconditionError, match="not a regular file"):
        within(10, lambda: TokenFile(path))


def test_rpcs_keep_answering_while_the_token_file_is_a_fifo(serve_inprocess, tmp_path: Path, caplog) -> None:
    """With --auth-scope all every call checks the token file: a FIFO there used to stop them all."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    server = serve_inprocess(auth_token_file=path, auth_scope="all", wait_loaded=False)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = infer_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(infer_pb.ServerLiveRequest(), metadata=metadata, timeout=10).live
        path.unlink()
        fifo(path)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ServerLive(infer_pb.ServerLiveRequest(), metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        path.unlink()
        path.write_text(f"{TOKEN}\n")
        assert stub.ServerLive(infer_pb.ServerLiveRequest(), metadata=metadata, timeout=10).live
    assert "refusing every token" in caplog.text
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


# -- the weights directory -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_weights_file_that_is_not_a_regular_file_is_a_clear_error_at_once(tmp_path: Path, kind: str) -> None:
    HOSTILE[kind](tmp_path / f"{TINY}.pth")
    with pytest.raises(WeightsUnavailableError, match=f"weights of {TINY}"):
        within(10, lambda: build_model(get_model_spec(TINY), WeightsSource.parse(str(tmp_path))))


def test_a_weights_file_may_be_a_symlink(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    stored = tmp_path / "elsewhere.pth"
    torch.save(net.state_dict(), stored)
    (tmp_path / f"{TINY}.pth").symlink_to(stored)
    model = build_model(get_model_spec(TINY), WeightsSource.parse(str(tmp_path)))
    assert torch.equal(model.state_dict()["classifier.2.weight"], net.state_dict()["classifier.2.weight"])
