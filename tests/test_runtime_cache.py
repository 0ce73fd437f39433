"""The runtime cache's collection (``--runtime-cache``, service/runtimes/export.py): the exports no
server uses and unused past the grace period are deleted, those a server leases (any process sharing
the cache, until it dies) or used lately stay, a reader is never broken, and a foreign or corrupt file
is never a crash. Then a server that publishes several versions keeps only the exports of what it
serves (with the built-in model's, and another server's).

Every network here is the tiny one (tests/tiny.py), exported in milliseconds; each test has a
cache of its own. Age is made by setting files' times back, never by waiting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from service.config import ONNXRUNTIME, FineTuneLimits, RuntimeConfig
from service.finetune.heads import build_trained_part
from service.finetune.store import ModelStore
from service.models import WeightsSource, build_model, get_model_spec
from service.runtimes.base import LOGITS
from service.runtimes.export import (
    ENTRY_FILE,
    GRACE_S,
    STAGING_GRACE_S,
    STAGING_PREFIX,
    ExportCache,
    ExportLeases,
    state_digest,
)
from service.runtimes.onnxruntime_backend import OnnxRuntimeBackend
from service.runtimes.select import BackendLoader, RuntimeOptions
from tests.test_orphans import no_tracebacks, poll, ready
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client import HeadConfig

CPU = torch.device("cpu")
SPEC = get_model_spec(TINY)
LONG_AGO = GRACE_S * 10  # seconds: unused for this long, an entry is fair game


def network(seed: int) -> torch.nn.Module:
    net = build_model(SPEC, WeightsSource.parse("random"))
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(seed * 1e-3)
    return net.eval()


def load(cache: Path, net: torch.nn.Module) -> tuple[BackendLoader, np.ndarray]:
    """An ONNX Runtime backend of ``net`` from ``cache`` (exported there if missing) and its logits."""
    loader = BackendLoader(SPEC, net, RuntimeOptions(ONNXRUNTIME, cache, threads=1))
    backend = loader.load(ONNXRUNTIME, CPU, torch.float32)
    batch = torch.from_numpy(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    return loader, backend.run(batch, LOGITS).numpy()


def expected_logits(net: torch.nn.Module) -> np.ndarray:
    batch = torch.from_numpy(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    with torch.inference_mode():
        return net(batch).numpy()


def entry_of(cache: Path, net: torch.nn.Module) -> Path:
    loader, _ = load(cache, net)
    assert loader.export_entry is not None
    return loader.export_entry


def age(path: Path, seconds: float = LONG_AGO) -> None:
    """Make ``path`` (an entry: its entry.json and directory) look unused for ``seconds``; an entry a
    collector running at the same time deletes meanwhile is left gone."""
    then = time.time() - seconds
    for item in (path / ENTRY_FILE, path):
        if not item.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                os.utime(item, (then, then))


def entries(cache: Path) -> set[str]:
    """ "<model>/<key>" of each sound-looking entry of ``cache``."""
    return {f"{e.parent.name}/{e.name}" for e in cache.glob("*/*") if (e / ENTRY_FILE).is_file() and "-torch" in e.name}


def name(entry: Path) -> str:
    return f"{entry.parent.name}/{entry.name}"


# -- exports at once ------------------------------------------------------------------------------


def test_networks_exported_by_several_threads_at_once_all_serve_their_own_logits(tmp_path: Path) -> None:
    """A job's publish, a store poll and a model load may each build a network in one process at the
    same moment; torch's exporter keeps its state in process globals, so the cache exports one at a
    time, and threads that want the same network share one export."""
    nets = [network(seed) for seed in (1, 2, 3, 1, 2, 3)]  # each network twice
    start = threading.Barrier(len(nets))
    results: list[object] = [None] * len(nets)

    def build(index: int) -> None:
        start.wait()
        try:
            results[index] = load(tmp_path, nets[index])[1]
        except Exception as exc:  # reported below
            results[index] = exc

    threads = [threading.Thread(target=build, args=(index,)) for index in range(len(nets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for net, result in zip(nets, results, strict=True):
        assert isinstance(result, np.ndarray), result
        np.testing.assert_allclose(result, expected_logits(net), rtol=1e-4, atol=1e-5)
    assert len(entries(tmp_path)) == 3  # one entry per network
    assert not list(tmp_path.glob(f"*/{STAGING_PREFIX}*"))  # no export left half done


# -- the rule --------------------------------------------------------------------------------------


def test_only_entries_unused_past_the_grace_and_leased_by_nobody_are_deleted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mine, leased, recent, unused = (entry_of(cache, network(seed)) for seed in range(4))
    for entry in (mine, leased, unused):
        age(entry)
    other_server = ExportLeases()  # another server's leases (its own locks, as another process's are)
    other_server.hold([leased])
    result = ExportCache(cache).collect(held=[mine])
    assert result.removed == [name(unused)] and result.removed_bytes > 0
    assert (result.kept, result.busy, result.recent) == (1, 1, 1)
    assert entries(cache) == {name(mine), name(leased), name(recent)}
    other_server.close()  # that server stopped serving it: it goes on the next pass
    assert ExportCache(cache).collect(held=[mine]).removed == [name(leased)]
    assert entries(cache) == {name(mine), name(recent)}


def test_using_an_entry_marks_it_used(tmp_path: Path) -> None:
    """A reader (another server's build) that uses an old entry touches it: no collector takes it
    within the grace, though nobody leases it yet."""
    cache = tmp_path / "cache"
    net = network(1)
    entry = entry_of(cache, net)
    age(entry)
    _, logits = load(cache, net)  # used again: found, not exported again
    np.testing.assert_allclose(logits, expected_logits(net), rtol=1e-4, atol=1e-5)
    assert ExportCache(cache).collect().recent == 1
    assert entries(cache) == {name(entry)}


LEASE_HOLDER = """
import sys
from pathlib import Path
from service.runtimes.export import ExportLeases
leases = ExportLeases()
leases.hold([Path(sys.argv[1])])
assert leases.held, "the lease was not taken"
print("held", flush=True)
sys.stdin.read()
"""


def test_a_lease_of_another_process_protects_its_entry_until_that_process_is_killed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = entry_of(cache, network(2))
    age(entry)
    holder = subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER, str(entry)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert ExportCache(cache).collect().busy == 1
        assert entries(cache) == {name(entry)}
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops its locks
        holder.wait()
    assert ExportCache(cache).collect().removed == [name(entry)]
    assert entries(cache) == set()


def test_a_reader_is_never_broken_by_a_collector_running_at_once(tmp_path: Path) -> None:
    """One thread uses an entry over and over, making it look unused for long before each use; another
    collects without pause. Every use, found or exported again after a collection, reads a whole entry
    (the runtime's loads, after the check, find their files); half the uses wait for a collection
    first, so the collector is shown to delete what nobody uses."""
    cache = tmp_path / "cache"
    net = network(3)
    expected = expected_logits(net)
    entry = entry_of(cache, net)
    digest = state_digest(net)
    batch = torch.from_numpy(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    stop = threading.Event()
    deleted = threading.Event()
    passes: list[int] = []
    failures: list[BaseException] = []

    def collect() -> None:
        try:
            while not stop.is_set():
                if ExportCache(cache).collect().removed:
                    deleted.set()
                passes.append(1)
        except BaseException as exc:
            failures.append(exc)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    uses = 40
    try:
        for use in range(uses):
            if use % 2:
                deleted.clear()  # before the entry ages: the collector may delete it at once
            age(entry)
            if use % 2:
                assert deleted.wait(60), "the collector never deleted the entry nobody used"
            # The path as a build uses it, without the loader's fallback (exporting again when a
            # runtime cannot load the entry): found or exported, the entry must stay while it is read.
            path = ExportCache(cache).onnx_file(SPEC, net, digest)
            for _ in range(2):  # a build loads it once per instance
                backend = OnnxRuntimeBackend.load(path, CPU, threads=1)
                np.testing.assert_allclose(backend.run(batch, LOGITS).numpy(), expected, rtol=1e-4, atol=1e-5)
            assert path.parent == entry
    finally:
        stop.set()
        collector.join(60)
    assert not failures, failures
    assert len(passes) > uses


def test_foreign_and_corrupt_files_in_the_cache_are_not_a_crash(tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    kept = entry_of(cache, network(4))
    model = kept.parent
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ENTRY_FILE).write_text("{}")
    (cache / "notes.txt").write_text("not ours")  # a file at the top
    (cache / "link").symlink_to(outside, target_is_directory=True)  # a symlink at the top
    (model / "README").write_text("not ours")  # a file among the entries
    key = kept.name
    corrupt = model / key.replace(key[:24], "a" * 24)  # ours by its name, its entry.json garbage
    corrupt.mkdir()
    (corrupt / ENTRY_FILE).write_bytes(b"\x00garbage")
    half = model / key.replace(key[:24], "b" * 24)  # ours, without entry.json (an export cut short)
    half.mkdir()
    (half / "model.onnx").write_bytes(b"half")
    linked = model / key.replace(key[:24], "c" * 24)  # a symlink named as an entry: never followed
    linked.symlink_to(outside, target_is_directory=True)
    fifo = model / key.replace(key[:24], "d" * 24)  # an entry whose entry.json is a FIFO
    fifo.mkdir()
    os.mkfifo(fifo / ENTRY_FILE)
    leftover = model / f".tmp-{key}-deadbeef"  # the staging of a writer that died
    leftover.mkdir()
    (leftover / "exported.onnx").write_bytes(b"x")
    writing = model / f".tmp-{key}-0badcafe"  # the staging of a writer at work
    writing.mkdir()
    for path in (corrupt, half, fifo, kept):
        age(path)
    age(leftover, STAGING_GRACE_S * 2)
    result = ExportCache(cache).collect(held=[kept])
    assert sorted(result.removed) == sorted([name(corrupt), name(half)])
    assert result.leftovers == [leftover.name]
    assert result.foreign >= 4  # notes.txt, link, README, the symlinked entry, the FIFO's entry
    survivors = {p.name for p in model.iterdir()}
    assert survivors == {key, "README", linked.name, fifo.name, writing.name}
    assert (outside / ENTRY_FILE).read_text() == "{}"  # a symlink's target is never touched
    assert (cache / "notes.txt").exists() and (cache / "link").is_symlink()
    no_tracebacks(caplog)


def test_an_unreadable_or_missing_cache_is_not_a_crash(tmp_path: Path) -> None:
    assert ExportCache(tmp_path / "none").collect().removed == []
    (tmp_path / "file").write_text("a file where the cache should be")
    assert ExportCache(tmp_path / "file").collect().removed == []


# -- a server that publishes versions -------------------------------------------------------------


def publish(store: Path, name: str, seed: int) -> None:
    """A version of ``name`` with tiny's last block trained (random values), as a job writes it."""
    torch.manual_seed(seed)
    part = build_trained_part(TINY, 1, HeadConfig(), TINY_FEATURE_DIM, 2)
    with torch.no_grad():
        for tensor in part.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
        part.std.abs_().add_(0.5)
    ModelStore(store, FineTuneLimits(keep_versions=3)).save(
        name=name, base_model=TINY, head_spec=HeadConfig(), head=part, labels=["a", "b"],
        loss="cross_entropy", job_id=f"job-{seed}", replace=True,
    )  # fmt: skip


def served_entries(cache: Path, model: str) -> set[str]:
    return {e for e in entries(cache) if e.startswith(f"{model}/")}


def test_publishing_versions_keeps_only_the_exports_served(serve_inprocess, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "runtime-cache"
    store, elsewhere = tmp_path / "store", tmp_path / "other-store"

    def start(location: Path):
        return serve_inprocess(
            models=(TINY,), weights="random", model_store=location, store_poll_seconds=3600,
            runtime=RuntimeConfig(name=ONNXRUNTIME, cache_dir=cache),
        )  # fmt: skip

    server, other = start(store), start(elsewhere)  # another server sharing the cache, its own store
    publish(elsewhere, "theirs", seed=9)
    poll(other)
    assert ready(other, "theirs")
    (builtin,) = served_entries(cache, TINY)
    (theirs,) = served_entries(cache, "theirs")
    seen: list[set[str]] = []
    for seed in (1, 2, 3):
        publish(store, "pets", seed)
        for entry in cache.glob("*/*"):
            age(entry)  # all of them unused for long: only leases keep them now
        poll(server)  # serves the new version, then collects
        seen.append(served_entries(cache, "pets"))
        assert len(seen[-1]) == 1, seen  # the version served; the one it replaced is gone
        assert served_entries(cache, TINY) == {builtin} and served_entries(cache, "theirs") == {theirs}
    assert len(set().union(*seen)) == 3  # each version had its own export
    # An older version asked for by number is loaded, exported again, and kept while resident.
    import tritonclient.grpc as triton

    tensor = triton.InferInput("PIXELS", [1, 3, 64, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 64, 64), dtype=np.float32))
    with triton.InferenceServerClient(server.target) as client:
        assert client.infer("pets", [tensor], model_version="1").get_response().model_version == "1"
    for entry in cache.glob("*/*"):
        age(entry)
    poll(server)
    assert served_entries(cache, "pets") == seen[0] | seen[2]
    other.stop()  # a server that stops releases its leases: its export goes on the next pass
    poll(server)
    assert served_entries(cache, "theirs") == set()
    assert served_entries(cache, TINY) == {builtin}
    no_tracebacks(caplog)
