"""Two writers of one name (two replicas sharing a store) never leave a model that cannot
be loaded, and ``replace=False`` holds across processes. The interleavings are forced
with the two steps of a save: ``stage`` (weights) and ``commit`` (manifest)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from service.errors import AlreadyExistsError
from service.finetune.heads import build_standardized_head
from service.finetune.store import ModelStore
from service.finetune.trainer import TrainMetrics
from vision_client.protocol import HeadConfig


def _stage(store: ModelStore, name: str, seed: int):
    torch.manual_seed(seed)
    head = build_standardized_head(HeadConfig(), 8, 2)
    return store.stage(
        name=name, base_model="alexnet", head_spec=HeadConfig(), head=head, labels=["a", "b"],
        loss="cross_entropy", metrics=TrainMetrics(), job_id=f"job-{seed}",
    )  # fmt: skip


def test_interleaved_replacements_leave_a_loadable_model(tmp_path: Path) -> None:
    first, second = ModelStore(tmp_path), ModelStore(tmp_path)  # two replicas on one store
    a = _stage(first, "pets", 1)
    b = _stage(second, "pets", 2)
    second.commit(b, replace=True)  # B lands first and collects garbage...
    assert second.load("pets")[0].version == b.version
    first.commit(a, replace=True)  # ...then A's manifest lands: A's weights must still be there
    manifest, _ = second.load("pets")
    assert manifest.version == a.version
    # B's weights, no longer named, survive the grace period (a reader may hold B's manifest).
    assert (tmp_path / "pets" / b.weights_file).exists()
    assert first.collect_garbage("pets", grace_s=0) == [b.weights_file]
    assert first.load("pets")[0].version == a.version


def test_a_commit_racing_a_delete_keeps_the_new_version(tmp_path: Path) -> None:
    writer, deleter = ModelStore(tmp_path), ModelStore(tmp_path)
    writer.commit(_stage(writer, "pets", 1), replace=True)
    staged = _stage(writer, "pets", 2)
    deleter.delete("pets")  # the folder still holds the staged weights: it is not removed
    writer.commit(staged, replace=True)
    assert deleter.load("pets")[0].version == staged.version


def test_create_only_commit_refuses_a_name_another_writer_took(tmp_path: Path) -> None:
    first, second = ModelStore(tmp_path), ModelStore(tmp_path)
    a = _stage(first, "pets", 1)
    b = _stage(second, "pets", 2)
    first.commit(a, replace=False)
    with pytest.raises(AlreadyExistsError, match="another replica"):
        second.commit(b, replace=False)
    assert first.load("pets")[0].version == a.version
    assert not (tmp_path / "pets" / b.weights_file).exists()  # the loser's weights, named by nobody


def _race(root: str, seed: int, start, results) -> None:
    store = ModelStore(Path(root))
    staged = _stage(store, "contested", seed)
    start.wait()
    try:
        store.commit(staged, replace=False)
        results.put(("won", staged.version))
    except AlreadyExistsError:
        results.put(("lost", staged.version))


def test_create_only_holds_across_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=_race, args=(str(tmp_path), seed, start, results)) for seed in range(4)]
    for process in processes:
        process.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(60)
    winners = [version for outcome, version in outcomes if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert ModelStore(tmp_path).load("contested")[0].version == winners[0]
