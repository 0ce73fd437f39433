"""Fine-tuning pieces without gRPC: heads, trainer, store, validation, example limits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from service.config import FineTuneLimits as Limits
from service.errors import InvalidInputError, ModelNotFoundError, StoreEntryError
from service.finetune.examples import ExampleCollector
from service.finetune.heads import Parallel, build_head
from service.finetune.spec import check_limits, config_from_wire
from service.finetune.store import ModelStore
from service.finetune.trainer import JobCancelled, TrainMetrics, split_indices, train_head
from vision_client import errors as client_errors
from vision_client.protocol import FineTuneConfig, HeadConfig, OptimizerConfig
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb


def blobs(n: int = 300, dim: int = 32, classes: int = 3, scale: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable clusters on a large, shifted scale (like raw backbone features)."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(n) % classes
    features = centers[labels] + torch.randn(n, dim, generator=generator)
    return features * scale + 1000.0, labels


@pytest.mark.parametrize("kind", ["linear", "two_layer", "parallel"])
def test_heads_have_the_promised_shapes(kind: str) -> None:
    head = build_head(HeadConfig(kind=kind, hidden=16, blocks=3), 10, 4)
    assert head(torch.randn(5, 10)).shape == (5, 4)


def test_parallel_block_is_a_clamped_product() -> None:
    head = build_head(HeadConfig(kind="parallel", hidden=2, blocks=1), 3, 5)
    block, clamp = head[0], head[1]
    assert isinstance(block, Parallel)
    left, right = (branch[0] for branch in block.branches)
    x = torch.randn(4, 3)
    assert torch.equal(clamp(block(x)), torch.clamp(left(x) * right(x), min=0))
    assert (clamp(block(x)) >= 0).all()


@pytest.mark.parametrize(
    "head, optimizer",
    [
        ("linear", OptimizerConfig(kind="sgd", lr=0.05)),
        ("two_layer", OptimizerConfig()),
        ("parallel", OptimizerConfig()),
    ],
)
def test_trainer_learns_separable_classes_whatever_the_feature_scale(head: str, optimizer: OptimizerConfig) -> None:
    features, labels = blobs()
    config = FineTuneConfig("alexnet", "blobs", head=HeadConfig(kind=head, hidden=32), optimizer=optimizer, epochs=15)
    reports = []
    result = train_head(features, labels, config, num_outputs=3, on_epoch=reports.append)
    assert result.metrics.validation_accuracy > 0.95
    assert [r.epoch for r in reports] == list(range(1, 16))
    assert reports[-1].train_loss < reports[0].train_loss
    assert result.head.mean.shape == (32,) and result.head.std.min() > 0


def test_mse_regression_head() -> None:
    features, _ = blobs(dim=8, scale=1.0)
    weights = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    targets = features @ weights / 100
    config = FineTuneConfig("alexnet", "reg", loss="mse", epochs=60, optimizer=OptimizerConfig(lr=1e-2))
    result = train_head(features, targets, config, num_outputs=2)
    assert result.metrics.validation_loss < 0.05  # on standardized targets: 5% of their variance
    assert math.isnan(result.metrics.validation_accuracy)
    predicted = result.head(features[:50]).detach()  # served outputs are in the targets' own units
    assert float(((predicted - targets[:50]) ** 2).mean() / targets[:50].var(0).mean()) < 0.1


def test_early_stopping_keeps_the_best_epoch() -> None:
    features, labels = blobs()
    config = FineTuneConfig("alexnet", "x", epochs=200, early_stopping_patience=3, optimizer=OptimizerConfig(lr=0.05))
    result = train_head(features, labels, config, num_outputs=3)
    assert result.metrics.epochs_run < 200
    assert result.metrics.best_epoch == result.metrics.epochs_run - 3


def test_training_stops_when_cancelled() -> None:
    features, labels = blobs()
    with pytest.raises(JobCancelled):
        train_head(features, labels, FineTuneConfig("alexnet", "x"), num_outputs=3, cancelled=lambda: True)


def test_split_is_stratified_and_seeded() -> None:
    labels = torch.tensor([0] * 50 + [1] * 10)
    train, validation = split_indices(labels, 0.2, seed=7, stratify=True)
    assert sorted(torch.cat([train, validation]).tolist()) == list(range(60))
    assert (labels[validation] == 0).sum() == 10 and (labels[validation] == 1).sum() == 2
    again, _ = split_indices(labels, 0.2, seed=7, stratify=True)
    assert torch.equal(train, again)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"output_model": "Bad Name!"}, "not a valid model name"),
        ({"head": pb.HeadSpec(kind="mlp")}, "head kind 'mlp' is unknown"),
        ({"optimizer": pb.OptimizerSpec(kind="rmsprop")}, "optimizer kind 'rmsprop' is unknown"),
        ({"optimizer": pb.OptimizerSpec(lr=-1)}, "optimizer lr"),
        ({"loss": "hinge"}, "loss 'hinge' is unknown"),
        ({"epochs": -1}, "epochs"),
        ({"epochs": 10_000}, "epochs"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
    ],
)
def test_bad_configs_are_invalid_input(change: dict, message: str) -> None:
    """What the server makes of a CreateJob config: converted, then checked against its limits."""
    wire = pb.FineTuneConfig(**{"base_model": "alexnet", "output_model": "ok", **change})
    with pytest.raises(InvalidInputError, match=message):
        check_limits(config_from_wire(wire), Limits())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HeadConfig(kind="mlp"), "head kind 'mlp' is unknown"),  # type: ignore[arg-type]
        (lambda: OptimizerConfig(lr=0), "optimizer lr"),
        (lambda: FineTuneConfig("alexnet", "ok", epochs=0), "epochs"),
        (lambda: FineTuneConfig("alexnet", "ok", loss="hinge"), "loss 'hinge' is unknown"),  # type: ignore[arg-type]
    ],
)
def test_the_same_checks_refuse_a_config_made_in_python(make, message: str) -> None:
    with pytest.raises(client_errors.InvalidInputError, match=message):
        make()


def test_example_collector_enforces_limits() -> None:
    config = FineTuneConfig("alexnet", "x")
    collector = ExampleCollector(config, Limits(max_examples=3, max_total_bytes=300))
    collector.add(b"a" * 10, "cat", [])
    with pytest.raises(InvalidInputError, match="no label"):
        collector.add(b"b", "", [])
    with pytest.raises(InvalidInputError, match="300 bytes"):
        collector.add(b"c" * 300, "dog", [])
    one_class = ExampleCollector(config, Limits())
    one_class.add(b"a", "cat", [])
    one_class.add(b"b", "cat", [])
    with pytest.raises(InvalidInputError, match="at least 2 classes"):
        one_class.finish()
    with pytest.raises(InvalidInputError, match="at least 2 examples"):
        ExampleCollector(config, Limits()).finish()
    regression = ExampleCollector(FineTuneConfig("alexnet", "x", loss="mse"), Limits())
    regression.add(b"a", "", [1.0, 2.0])
    with pytest.raises(InvalidInputError, match="has 1 values"):
        regression.add(b"b", "", [1.0])


def _trained_head():
    features, labels = blobs(dim=6)
    return train_head(features, labels, FineTuneConfig("alexnet", "x", epochs=2), num_outputs=3).head


def test_store_round_trip_replace_and_delete(tmp_path) -> None:
    store = ModelStore(tmp_path, Limits(keep_versions=1))  # a replaced version is not kept (test_model_versions)
    head = _trained_head()
    saved = store.save(
        name="pets", base_model="alexnet", head_spec=HeadConfig(), head=head, labels=["a", "b", "c"],
        loss="cross_entropy", metrics=TrainMetrics(validation_accuracy=1.0), job_id="j1",
    )  # fmt: skip
    manifest, loaded = store.load("pets")
    assert manifest == saved and list(store.entries()[0]) == ["pets"]
    x = torch.randn(4, 6) * 50 + 1000
    assert torch.equal(loaded(x), head(x))
    on_disk = json.loads((tmp_path / "pets" / "manifest.json").read_text())
    assert on_disk["base_model"] == "alexnet" and on_disk["labels"] == ["a", "b", "c"]
    assert on_disk["head"]["kind"] == "linear" and on_disk["metrics"]["validation_accuracy"] == 1.0
    again = store.save(
        name="pets", base_model="alexnet", head_spec=HeadConfig(), head=head, labels=["a", "b", "c"],
        loss="cross_entropy", job_id="j2",
    )  # fmt: skip
    assert again.version != saved.version
    # The old weights stay for a grace period (a reader may have read the old manifest)...
    assert sorted(p.name for p in (tmp_path / "pets").glob("*.safetensors")) == [saved.weights_file, again.weights_file]
    # ...and go once it has passed.
    assert sorted(store.collect_garbage("pets", grace_s=0)) == [saved.weights_file, f"manifest-{saved.version}.json"]
    store.delete("pets")
    assert store.entries() == ({}, {}) and not (tmp_path / "pets").exists()
    with pytest.raises(ModelNotFoundError):
        store.delete("pets")


def test_store_never_serves_half_written_or_tampered_weights(tmp_path) -> None:
    store = ModelStore(tmp_path)
    saved = store.save(
        name="pets", base_model="alexnet", head_spec=HeadConfig(), head=_trained_head(), labels=["a", "b", "c"],
        loss="cross_entropy", job_id="j",
    )  # fmt: skip
    weights = tmp_path / "pets" / saved.weights_file
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(StoreEntryError, match="sha256"):
        store.load("pets")
    (tmp_path / "pets" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreEntryError, match="not valid JSON"):
        store.load("pets")
    assert not list(tmp_path.glob("pets/.*.tmp"))
