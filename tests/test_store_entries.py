"""A model store holding bad entries: each is skipped with one logged error and a metric,
and the good entries, start-up, readiness and shutdown go on."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.config import FineTuneLimits
from service.errors import StoreEntryError
from service.finetune.store import ModelStore
from service.host.files import FileRefused, TimedOut, call_with_timeout, read_bounded
from tests.metrics_util import sample_value, scrape
from tests.store_util import manifest_of, save_head, write_manifest
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import grpc_service_pb2_grpc as pb_grpc


def _copy(store: Path, source: str, name: str, **changes: object) -> dict:
    """The manifest of ``source`` under ``name`` (its weights file copied), with ``changes``."""
    data = manifest_of(store, source)
    (store / name).mkdir()
    weights = data["weights"]["file"]
    (store / name / weights).write_bytes((store / source / weights).read_bytes())
    data["name"] = name
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        else:
            data[key] = value
    write_manifest(store, name, data)
    return data


@pytest.fixture
def bad_store(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A store with two good models and one bad entry of every kind; ``{entry: reason}``."""
    store = tmp_path / "store"
    save_head(store, "good-one", seed=1)
    save_head(store, "template", seed=2)
    expected: dict[str, str] = {}

    _copy(store, "template", "unknown-head", **{"head.kind": "transformer"})
    expected["unknown-head"] = "unknown_head"
    write_manifest(store, "deep-json", "[" * 100_000 + "]" * 100_000)
    expected["deep-json"] = "bad_json"
    _copy(store, "template", "nan-json")
    (store / "nan-json" / "manifest.json").write_text(
        (store / "nan-json" / "manifest.json").read_text().replace('"created_at": ', '"created_at": NaN, "x": ')
    )
    expected["nan-json"] = "bad_json"
    _copy(store, "template", "bad-dims", feature_dim=-5)
    expected["bad-dims"] = "bad_dimensions"
    save_head(store, "wrong-dims", features=2048)  # a head for resnet101's features, on alexnet
    expected["wrong-dims"] = "bad_dimensions"
    _copy(store, "template", "lying-dims", feature_dim=2048)  # the manifest disagrees with its weights
    expected["lying-dims"] = "bad_weights"
    _copy(store, "template", "huge-head", **{"head.kind": "parallel", "head.hidden": 8192, "head.blocks": 8})
    expected["huge-head"] = "bad_dimensions"
    _copy(store, "template", "future-format", format_version=3)  # 2: a model with trained backbone blocks
    expected["future-format"] = "format_version"
    _copy(store, "template", "wrong-types", labels="abc")
    expected["wrong-types"] = "bad_manifest"
    data = _copy(store, "template", "fifo-weights")
    os.unlink(store / "fifo-weights" / data["weights"]["file"])
    os.mkfifo(store / "fifo-weights" / data["weights"]["file"])  # a stand-in for a hung file system
    expected["fifo-weights"] = "not_regular_file"
    _copy(store, "template", "fifo-manifest")
    os.unlink(store / "fifo-manifest" / "manifest.json")
    os.mkfifo(store / "fifo-manifest" / "manifest.json")
    expected["fifo-manifest"] = "not_regular_file"
    _copy(store, "template", "dev-zero", **{"weights.file": "/dev/zero"})
    expected["dev-zero"] = "outside_folder"
    _copy(
        store,
        "template",
        "escape",
        **{"weights.file": "../good-one/" + manifest_of(store, "good-one")["weights"]["file"]},
    )
    expected["escape"] = "outside_folder"
    data = _copy(store, "template", "symlink-zero")
    os.unlink(store / "symlink-zero" / data["weights"]["file"])
    os.symlink("/dev/zero", store / "symlink-zero" / data["weights"]["file"])
    expected["symlink-zero"] = "unreadable"  # O_NOFOLLOW: a link is not opened at all
    data = _copy(store, "template", "huge-file")
    with open(store / "huge-file" / data["weights"]["file"], "r+b") as file:
        file.truncate(1 << 40)  # sparse: a terabyte that costs nothing on disk
    expected["huge-file"] = "too_large"
    data = _copy(store, "template", "tampered")
    weights = store / "tampered" / data["weights"]["file"]
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    expected["tampered"] = "digest_mismatch"
    _copy(store, "template", "other-base", base_model="vgg16")
    expected["other-base"] = "base_not_served"
    save_head(store, "long-label", labels=("a", "x" * 5000))  # weights and digest whole: only a label is bad
    expected["long-label"] = "bad_label"
    save_head(store, "override-label", labels=("a", "\u202egnp.exe"))
    expected["override-label"] = "bad_label"
    _copy(store, "template", "alexnet")
    expected["alexnet"] = "builtin_name"
    _copy(store, "template", "liveness")
    expected["liveness"] = "bad_name"
    write_manifest(store, "Bad Name\n", "{}")  # an empty folder is no entry: it holds no object
    expected["Bad Name\n"] = "bad_name"
    return store, expected


def _logits(target: str, model: str) -> np.ndarray:
    pixels = np.zeros((1, 3, 64, 64), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="FP32", shape=list(pixels.shape))
    request = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[pixels.tobytes()])
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)


def test_bad_entries_are_skipped_with_one_error_each_and_the_rest_is_served(bad_store, serve_inprocess, caplog) -> None:
    store, expected = bad_store
    caplog.set_level(logging.ERROR, logger="service.finetune.catalog")
    server = serve_inprocess(model_store=store, store_poll_seconds=0.2)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        index = {m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index == {"alexnet", "good-one", "template"}
    assert _logits(server.target, "good-one").shape == (3,)

    for _ in range(3):  # more polls: errors are not logged or counted again
        server.call(server.server.store_sync.sync_once())
    text = scrape(server.metrics_url)
    for reason in set(expected.values()):
        count = sample_value(text, "vision_store_errors_total", reason=reason)
        assert count == list(expected.values()).count(reason), (reason, count)
    for entry in expected:
        logged = [r for r in caplog.records if f"skipping {entry!r}" in r.getMessage()]
        assert len(logged) == 1, (entry, [r.getMessage() for r in caplog.records])

    # A bad entry that is fixed is picked up; a good one that goes bad keeps its last good version.
    save_head(store, "future-format", seed=3)
    (store / "good-one" / "manifest.json").write_text("{")
    deadline = time.monotonic() + 30
    while "future-format" not in server.server.repository:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "good-one" in server.server.repository


def test_a_store_that_is_all_bad_still_lets_the_server_start_and_stop(tmp_path, serve_inprocess) -> None:
    store = tmp_path / "store"
    write_manifest(store, "deep", "{" * 50_000)
    os.mkdir(store / "fifo")
    os.mkfifo(store / "fifo" / "manifest.json")
    server = serve_inprocess(model_store=store)
    with grpc.insecure_channel(server.target) as channel:
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest()).ready
    server.stop()  # returns: nothing is stuck on the FIFO


def test_reads_refuse_fifos_devices_symlinks_and_oversized_files(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FileRefused) as refused:
        read_bounded(tmp_path / "fifo", 100)  # returns at once: opened without blocking
    assert refused.value.reason == "not_regular_file"
    with pytest.raises(FileRefused, match="not a regular file"):
        read_bounded(Path("/dev/zero"), 100)
    os.symlink("/dev/zero", tmp_path / "link")
    with pytest.raises(FileRefused) as refused:
        read_bounded(tmp_path / "link", 100)
    assert refused.value.reason == "unreadable"
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(FileRefused) as refused:
        read_bounded(tmp_path / "big", 100)
    assert refused.value.reason == "too_large"
    assert read_bounded(tmp_path / "big", 101) == b"x" * 101


def test_a_read_that_hangs_times_out_without_holding_the_caller() -> None:
    import asyncio

    release = threading.Event()

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(TimedOut):
            await call_with_timeout(release.wait, 0.2)
        return time.monotonic() - started

    try:
        assert asyncio.run(main()) < 30  # not a timing assertion: only that it came back at all
    finally:
        release.set()


def test_a_planted_label_is_refused_by_the_rule_of_the_job_api(tmp_path) -> None:
    """The store's reader and a job's examples apply one rule, with the server's own limit; the
    error names the label's position and quotes it escaped and cut, never the raw character."""
    save_head(tmp_path, "planted", labels=("a", "\u202eexe.txt", "c"))
    with pytest.raises(StoreEntryError) as error:
        ModelStore(tmp_path).load("planted")
    assert error.value.reason == "bad_label"
    assert "label 1 '\\u202eexe.txt' has U+202E (RIGHT-TO-LEFT OVERRIDE)" in error.value.message
    assert "\u202e" not in error.value.message
    save_head(tmp_path, "long", labels=("a", "x" * 5000))
    with pytest.raises(StoreEntryError, match="is 5000 bytes of UTF-8, over the limit of 128") as error:
        ModelStore(tmp_path).load("long")
    assert len(error.value.message) < 500
    assert ModelStore(tmp_path, FineTuneLimits(max_label_length=5000)).load("long")[0].labels[1] == "x" * 5000
    save_head(tmp_path, "rtl", labels=("\u05e9\u05dc\u05d5\u05dd", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0645"))
    assert ModelStore(tmp_path).load("rtl")[0].labels[0] == "\u05e9\u05dc\u05d5\u05dd"


def test_store_refuses_manifests_field_by_field(tmp_path) -> None:
    store = tmp_path
    save_head(store, "ok")
    base = manifest_of(store, "ok")
    cases = {
        "no-version": ({k: v for k, v in base.items() if k != "format_version"}, "bad_manifest"),
        "a-list": ([1, 2, 3], "bad_manifest"),
        "other-name": ({**base, "name": "ok2"}, "bad_manifest"),
        "bool-dims": ({**base, "feature_dim": True}, "bad_manifest"),
        "too-many-labels": ({**base, "labels": ["x"] * 100_000}, "bad_dimensions"),
        "no-labels": ({**base, "labels": []}, "bad_dimensions"),
        "weights-dir": ({**base, "weights": {"file": "..", "sha256": "0" * 64}}, "outside_folder"),
        "bad-metrics": ({**base, "metrics": {"train_loss": "low"}}, "bad_manifest"),
        "long-label": ({**base, "labels": ["a", "x" * 5000, "c"]}, "bad_label"),
        "override-label": ({**base, "labels": ["a", "b\u202e", "c"]}, "bad_label"),
        "newline-label": ({**base, "labels": ["a", "b\nc", "c"]}, "bad_label"),
        "isolate-label": ({**base, "labels": ["a", "\u2067b", "c"]}, "bad_label"),
        "empty-label": ({**base, "labels": ["a", "", "c"]}, "bad_label"),
    }
    for name, (data, reason) in cases.items():
        if isinstance(data, dict) and "name" in data and data["name"] == "ok":
            data = {**data, "name": name}
        write_manifest(store, name, data)
        with pytest.raises(StoreEntryError) as error:
            ModelStore(store).load(name)
        assert error.value.reason == reason, (name, error.value)


@pytest.mark.parametrize(
    "path, action", [("poll", "delete"), ("explicit load", "delete"), ("poll", "unload")], ids="-".join
)
def test_a_model_withdrawn_while_the_store_reads_it_stays_withdrawn(
    tmp_path, serve_inprocess, monkeypatch, path, action
) -> None:
    """DeleteModel or RepositoryModelUnload lands between a store read of the entry and its
    activation: the read's result is dropped, not served again under the name."""
    from service.errors import StoreEntryError
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb
    from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as ft_grpc

    store = tmp_path / "store"
    save_head(store, "doomed", seed=1)
    server = serve_inprocess(model_store=store, store_poll_seconds=3600)  # this test runs the polls
    vision = server.server
    assert vision is not None and vision.store is not None and vision.store_sync is not None
    sync = vision.store_sync
    assert "doomed" in vision.repository
    save_head(store, "doomed", seed=2)  # a new version: the next poll reads the entry again

    read_done, release = threading.Event(), threading.Event()
    load = vision.store.load

    def slow_load(name: str):  # the entry is read whole, then the reader stalls before returning
        result = load(name)
        read_done.set()
        release.wait(30)
        return result

    monkeypatch.setattr(vision.store, "load", slow_load)
    reading = server.submit(sync.sync_once() if path == "poll" else vision.finetuned.serve_stored("doomed"))
    assert read_done.wait(30)
    with grpc.insecure_channel(server.target) as channel:
        if action == "delete":
            assert ft_grpc.FineTuningStub(channel).DeleteModel(ft_pb.DeleteModelRequest(name="doomed")).deleted
        else:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="doomed"), timeout=30
            )
    release.set()
    if path == "poll":
        reading.result(30)
    else:
        with pytest.raises(StoreEntryError, match="deleted or unloaded while it was read"):
            reading.result(30)
    with grpc.insecure_channel(server.target) as channel:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest()).models
    states = {m.name: m.state for m in index}
    if action == "delete":
        assert "doomed" not in vision.repository and not (store / "doomed" / "manifest.json").exists()
        assert set(states) == {"alexnet"}
    else:
        assert vision.repository.get("doomed").unloaded and (store / "doomed" / "manifest.json").exists()
        assert states == {"alexnet": "READY", "doomed": "UNAVAILABLE"}
    for outcome in ("withdrawn", "missing"):  # outcomes, not errors
        assert sample_value(scrape(server.metrics_url), "vision_store_errors_total", reason=outcome) in (None, 0)
