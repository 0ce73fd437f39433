"""Augmentation, class weights and per-class figures of fine-tuning jobs.

The trainer's figures are compared with torch's ``CrossEntropyLoss(weight=...)`` and with
scikit-learn's metrics on the same predictions; the views with torchvision's own transforms;
and a job on a real in-process server (the tiny network, digits images) shows the figures over
gRPC, REST, the SDK, the CLI and in the job's record in the store.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight
from torchvision.models import AlexNet_Weights

from service.config import FineTuneLimits
from service.errors import InvalidInputError
from service.finetune.augment import ViewMaker, crop_box
from service.finetune.examples import ExampleCollector
from service.finetune.history import JobHistory
from service.finetune.spec import MAX_AUGMENT_VIEWS, check_limits, config_from_wire
from service.finetune.trainer import EpochReport, TrainMetrics, split_indices, train_head
from service.inference.preprocess import ImageDecoder
from tests import test_console
from tests.inprocess import InProcessServer, running, tiny_config
from tests.support.finetune_data import digits
from tests.test_console import Page, cell
from tests.tiny import TINY
from vision_client import AugmentationConfig, Client, FineTuneConfig, OptimizerConfig
from vision_client import cli as client_cli
from vision_client.errors import InvalidInputError as ClientInvalidInput
from vision_client.protocol import to_message
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

LABELS = ["ant", "bee", "cat"]
chromium = test_console.browser  # the console tests' headless Chromium, as the fixture "chromium"


def uneven(n: int = 240, dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping classes of 60%, 30% and 10% of the examples: a head confuses them."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.tensor([0] * (6 * n // 10) + [1] * (3 * n // 10) + [2] * (n - 9 * n // 10))
    centers = torch.randn(3, dim, generator=generator)
    return centers[targets] + 1.2 * torch.randn(n, dim, generator=generator), targets


# -- class weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["auto", {"bee": 4.0, "cat": 0.25}])
def test_class_weights_weigh_the_loss_as_torch_cross_entropy_does(weights: Any) -> None:
    features, targets = uneven()
    config = FineTuneConfig(
        "tiny",
        "weighted",
        epochs=1,
        batch_size=4096,  # one step: the epoch's train loss is the loss of the initial head
        optimizer=OptimizerConfig(lr=1e-9),  # and that step leaves the head as it was (to float32)
        validation_fraction=0.25,
        refit=False,
        class_weights=weights,
    )
    result = train_head(features, targets, config, num_outputs=3, labels=LABELS)
    if weights == "auto":
        expected_weights = compute_class_weight("balanced", classes=np.arange(3), y=targets.numpy())
    else:
        expected_weights = np.array([1.0, 4.0, 0.25])
    weight = torch.tensor(expected_weights, dtype=torch.float32)
    train, validation = split_indices(targets, 0.25, config.seed, stratify=True)
    head = result.head
    with torch.no_grad():
        for rows, reported in ((validation, result.metrics.validation_loss), (train, result.metrics.train_loss)):
            outputs = head.standardized(features[rows])
            weighted = float(torch.nn.CrossEntropyLoss(weight=weight)(outputs, targets[rows]))
            plain = float(torch.nn.CrossEntropyLoss()(outputs, targets[rows]))
            assert reported == pytest.approx(weighted, rel=1e-4)
            assert abs(weighted - plain) > 1e-3, "the weights must change the loss for this test to mean anything"


def test_class_weights_change_what_is_learned() -> None:
    features, targets = uneven(seed=1)
    figures = {}
    for weights in ("none", "auto"):
        config = FineTuneConfig("tiny", "w", epochs=30, refit=False, class_weights=weights, seed=3)
        figures[weights] = train_head(features, targets, config, num_outputs=3, labels=LABELS).metrics.per_class()
    # Balanced weights trade the large class's recall for the small one's.
    assert figures["auto"][2].recall > figures["none"][2].recall
    assert figures["auto"][0].recall <= figures["none"][0].recall


def test_class_weight_settings_are_checked_before_any_image() -> None:
    limits = FineTuneLimits()
    for bad in ({"cat": -1.0}, {"cat": float("nan")}, {"cat": float("inf")}, {}, "balanced", {"": 1.0}):
        with pytest.raises(ClientInvalidInput, match="class"):
            FineTuneConfig("tiny", "w", class_weights=bad)
    with pytest.raises(ClientInvalidInput, match="cross_entropy only"):
        FineTuneConfig("tiny", "w", loss="mse", class_weights="auto")
    with pytest.raises(InvalidInputError, match="over the limit of 128; use a shorter class name"):
        check_limits(FineTuneConfig("tiny", "w", class_weights={"x" * 500: 2.0}), limits)
    # A class no example has: refused once the examples are in, before any of them is decoded.
    collector = ExampleCollector(FineTuneConfig("tiny", "w", class_weights={"dog": 2.0, "ant": 1.0}), limits)
    for label in ("ant", "bee"):
        collector.add(b"not decoded yet", label, [])
    with pytest.raises(InvalidInputError, match="'dog', which no example has"):
        collector.finish()


def test_wire_config_round_trips_and_bad_values_are_refused() -> None:
    config = FineTuneConfig(
        "tiny",
        "w",
        augmentation=AugmentationConfig(views=3, crop_scale=(0.5, 1.0), horizontal_flip=False),
        class_weights={"ant": 2.0},
    )
    back = config_from_wire(to_message(config))
    assert back.augmentation == config.augmentation and back.class_weights == (("ant", 2.0),)
    assert config_from_wire(pb.FineTuneConfig(base_model="tiny", output_model="w")).augmentation.views == 0
    for message in (
        pb.FineTuneConfig(augmentation=pb.AugmentationSpec(views=2, crop_scale_min=-0.5)),
        pb.FineTuneConfig(augmentation=pb.AugmentationSpec(views=2, crop_scale_max=1.5)),
        pb.FineTuneConfig(augmentation=pb.AugmentationSpec(views=2, crop_scale_min=0.9, crop_scale_max=0.5)),
        pb.FineTuneConfig(class_weights=pb.ClassWeightsSpec(mode="explicit", weights={"a": -2.0})),
        pb.FineTuneConfig(class_weights=pb.ClassWeightsSpec(mode="explicit", weights={"a": float("inf")})),
        pb.FineTuneConfig(class_weights=pb.ClassWeightsSpec(mode="auto", weights={"a": 2.0})),
    ):
        message.base_model, message.output_model = "tiny", "w"
        with pytest.raises(InvalidInputError):
            config_from_wire(message)
    too_many = FineTuneConfig("tiny", "w", augmentation=AugmentationConfig(views=MAX_AUGMENT_VIEWS + 1))
    with pytest.raises(InvalidInputError, match="augmentation views must be at most"):
        check_limits(too_many, FineTuneLimits())


def test_augmented_jobs_take_fewer_examples_so_their_features_stay_bounded() -> None:
    limits = FineTuneLimits(max_examples=12)
    collector = ExampleCollector(FineTuneConfig("tiny", "w", augmentation=AugmentationConfig(views=3)), limits)
    for index in range(3):
        collector.add(b"x", LABELS[index % 2], [])
    with pytest.raises(InvalidInputError, match=r"with 3 augmented views per example a job takes at most 3 examples"):
        collector.add(b"x", "ant", [])


# -- per-class figures ----------------------------------------------------------------------------


def test_confusion_matrix_and_per_class_figures_equal_sklearns() -> None:
    features, targets = uneven(seed=2)
    config = FineTuneConfig("tiny", "cm", epochs=5, refit=False, validation_fraction=0.3, seed=5)
    metrics = train_head(features, targets, config, num_outputs=3, labels=LABELS).metrics
    result_head = train_head(features, targets, config, num_outputs=3, labels=LABELS).head
    _, validation = split_indices(targets, 0.3, config.seed, stratify=True)
    with torch.no_grad():
        predicted = result_head.standardized(features[validation]).argmax(1).numpy()
    actual = targets[validation].numpy()
    expected = confusion_matrix(actual, predicted, labels=[0, 1, 2])
    assert metrics.dense_confusion() == expected.tolist()
    assert (expected - np.diag(np.diag(expected))).sum() > 0, "a matrix without confusion tests little"
    precision, recall, _, support = precision_recall_fscore_support(
        actual, predicted, labels=[0, 1, 2], zero_division=0
    )
    figures = metrics.per_class()
    assert [f.precision for f in figures] == pytest.approx(precision.tolist())
    assert [f.recall for f in figures] == pytest.approx(recall.tolist())
    assert [f.support for f in figures] == support.tolist()
    assert metrics.classes == 3 and sum(count for *_, count in metrics.confusion) == len(validation)


def test_metrics_with_their_matrix_survive_json_and_bad_records_are_refused() -> None:
    metrics = TrainMetrics(train_loss=0.5, validation_examples=5, classes=3, confusion=((0, 0, 2), (1, 2, 3)))
    assert TrainMetrics.from_json(json.loads(json.dumps(metrics.to_json()))) == metrics
    assert TrainMetrics.from_json({"train_loss": 1.0}).confusion == ()  # records of older servers
    for bad in ([[0, 3, 1]], [[0, 0, -1]], [[0, 0]], [["0", 0, 1]], "cells", [[0, 0, True]]):
        with pytest.raises(ValueError, match="confusion"):
            TrainMetrics.from_json({"classes": 3, "confusion": bad})
    with pytest.raises(ValueError, match="classes"):
        TrainMetrics.from_json({"classes": -1, "confusion": []})


# -- augmentation ---------------------------------------------------------------------------------


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def decoder() -> ImageDecoder:
    """The serving decoder of AlexNet's preprocessing (only its ``decode`` is used here)."""
    transforms: Any = AlexNet_Weights.IMAGENET1K_V1.transforms()
    try:
        from service.models.preprocessing import preprocessing_of
    except ImportError:  # the decoder of a server whose preprocessing is torchvision's transform itself
        return ImageDecoder(transforms, max_pixels=10_000_000)
    return ImageDecoder(preprocessing_of(transforms), max_pixels=10_000_000)


def maker(seed: int = 7, **augmentation: Any) -> ViewMaker:
    settings = AugmentationConfig(**{"views": 3, **augmentation})
    return ViewMaker.of(settings, seed, AlexNet_Weights.IMAGENET1K_V1.transforms())


def test_views_are_a_function_of_seed_example_and_view(decoder: ImageDecoder) -> None:
    images = [png(300, 200, seed) for seed in range(4)]
    first = np.empty((3 * 4, 3, 224, 224), dtype=np.float32)
    maker().views_into(decoder, images, 10, first)
    again = np.empty_like(first)
    for start in (0, 2):  # other chunks, same examples: the same views
        part = np.empty((3 * 2, 3, 224, 224), dtype=np.float32)
        maker().views_into(decoder, images[start : start + 2], 10 + start, part)
        for view in range(3):
            again[view * 4 + start : view * 4 + start + 2] = part[view * 2 : view * 2 + 2]
    assert np.array_equal(first, again)
    assert not np.array_equal(first[0], first[4]), "two views of one image differ"
    other = np.empty_like(first)
    maker(seed=8).views_into(decoder, images, 10, other)
    assert not np.array_equal(first, other), "another seed, other views"


def test_a_view_is_torchvisions_resized_crop_and_flip_of_the_image(decoder: ImageDecoder) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    weights = AlexNet_Weights.IMAGENET1K_V1.transforms()
    image = decoder.decode(png(320, 180, 3))
    views = maker(crop_scale=(0.2, 0.9))
    made = np.empty((3, 224, 224), dtype=np.float32)
    flips = 0
    for view in range(1, 9):
        rng = views.generator(0, view)
        top, left, height, width = crop_box(320, 180, (0.2, 0.9), rng)
        assert 0 <= top <= 180 - height and 0 <= left <= 320 - width
        flip = rng.random() < 0.5
        flips += flip
        crop = F.resized_crop(image, top, left, height, width, [224, 224], InterpolationMode.BILINEAR, antialias=True)
        expected = F.normalize(F.to_tensor(F.hflip(crop) if flip else crop), weights.mean, weights.std)
        views.view_into(image, 0, view, made)
        assert torch.allclose(torch.from_numpy(made), expected, atol=1e-6)
    assert 0 < flips < 8, "some views are mirrored, some not"
    # Without crop, a view is the model's own preprocessing, mirrored or not.
    served = weights(image)
    for view in range(1, 6):
        maker(crop=False).view_into(image, 0, view, made)
        assert torch.equal(torch.from_numpy(made), served) or torch.equal(torch.from_numpy(made), served.flip(-1))


def test_crops_take_the_share_of_the_image_asked_for() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, height, width = crop_box(400, 300, (0.3, 0.6), rng)
        assert 0 <= top <= 300 - height and 0 <= left <= 400 - width
        assert 0.3 * 0.98 <= height * width / (400 * 300) <= 0.6 * 1.02
        assert 3 / 4 * 0.95 <= width / height <= 4 / 3 * 1.05
    assert crop_box(1000, 10, (0.9, 1.0), rng) == (0, 493, 10, 13), "too wide: the central crop, as torchvision's"


def test_augmented_features_train_and_the_result_depends_on_the_seed_only() -> None:
    features, targets = uneven(n=120, seed=4)
    generator = torch.Generator().manual_seed(9)
    views = torch.cat(
        [features] + [features + 0.5 * torch.randn(features.shape, generator=generator) for _ in range(2)]
    )
    config = FineTuneConfig("tiny", "aug", epochs=4, augmentation=AugmentationConfig(views=2), seed=11)
    reports: dict[str, list[EpochReport]] = {"views": [], "plain": []}
    first = train_head(views, targets, config, num_outputs=3, labels=LABELS, on_epoch=reports["views"].append)
    second = train_head(views, targets, config, num_outputs=3, labels=LABELS)
    plain = train_head(features, targets, config, num_outputs=3, labels=LABELS, on_epoch=reports["plain"].append)
    assert first.metrics == replace(second.metrics, train_seconds=first.metrics.train_seconds)
    assert first.metrics.train_loss != plain.metrics.train_loss, "the views are trained on"
    _, validation = split_indices(targets, config.validation_fraction, config.seed, stratify=True)
    assert first.metrics.validation_examples == plain.metrics.validation_examples == len(validation)
    for curve in reports.values():  # both learn
        assert curve[-1].train_loss < curve[0].train_loss


# -- a job on a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    store = tmp_path_factory.mktemp("metrics-store")
    with running(tiny_config(store, http_port=0)) as started:
        yield started


def digit_examples(per_class: int = 20) -> list[tuple[bytes, str]]:
    images, targets = digits()
    picked: list[tuple[bytes, str]] = []
    for digit in (0, 1, 7):
        picked += [(images[i], f"d{digit}") for i in np.flatnonzero(targets == digit)[:per_class]]
    return picked


@pytest.mark.parametrize("views", [0, 2])
def test_a_jobs_figures_over_grpc_rest_the_sdk_the_cli_and_its_record(
    server: InProcessServer, views: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = FineTuneConfig(
        TINY,
        f"digits-metrics-{views}",
        epochs=3,
        batch_size=16,
        validation_fraction=0.25,
        augmentation=AugmentationConfig(views=views),
        class_weights="auto",
    )
    with Client(server.target, timeout=60) as client:
        result = client.fine_tune(config, digit_examples())
        assert result.succeeded, result.job.error
        job_id = result.job.id
        sdk = client.job(job_id)
        if views:  # the same job again: the same views, so the same figures
            again = client.fine_tune(dataclasses.replace(config, replace=True), digit_examples())
            assert dataclasses.replace(again.job.metrics, train_seconds=0) == dataclasses.replace(
                sdk.metrics, train_seconds=0
            )
    extracted = [event.message for event in result.events if event.kind == "features"]
    assert extracted[-1] == "features of 60/60 examples" + (f" and {views} views of each" if views else "")
    assert [c.label for c in sdk.metrics.class_metrics] == ["d0", "d1", "d7"]
    assert sum(c.support for c in sdk.metrics.class_metrics) == sdk.metrics.validation_examples == 15
    assert sum(map(sum, sdk.metrics.confusion_matrix())) == 15
    assert sdk.config is not None and sdk.config.augmentation.views == views and sdk.config.class_weights == "auto"

    with grpc.insecure_channel(server.target) as channel:
        answer = pb_grpc.FineTuningStub(channel).GetJob(pb.GetJobRequest(job_id=job_id))
    assert [(c.precision, c.recall, c.support) for c in answer.metrics.class_metrics] == [
        (c.precision, c.recall, c.support) for c in sdk.metrics.class_metrics
    ]
    cells = [(c.actual, c.predicted, c.count) for c in answer.metrics.confusion_matrix]
    assert cells == [(c.actual, c.predicted, c.count) for c in sdk.metrics.confusion]
    assert answer.config.augmentation.views == views and answer.config.class_weights.mode == "auto"

    with Client(server.http_url, timeout=60) as rest:
        assert rest.job(job_id).metrics == sdk.metrics  # the REST binding carries the same figures

    assert server.server is not None
    history = JobHistory(server.config.model_store, 100)
    record = history.get(job_id)  # the record in the store, written as the job ends (maybe just after)
    deadline = time.monotonic() + 60
    while record is None and time.monotonic() < deadline:
        time.sleep(0.05)
        record = history.get(job_id)
    assert record is not None
    assert [(a, p, n) for a, p, n in record.metrics.confusion] == cells
    assert record.config.augmentation.views == views

    assert client_cli.main(["--target", server.target, "jobs", "show", job_id]) == 0
    shown = capsys.readouterr().out
    assert "per class (validation split)" in shown and "confusion matrix" in shown
    assert re.search(r"class weights +auto", shown)
    assert ("augmentation" in shown) == bool(views)
    assert client_cli.main(["--target", server.target, "jobs", "show", job_id, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["confusion_matrix"] == sdk.metrics.confusion_matrix()


def test_bad_settings_are_refused_before_any_image_is_read(server: InProcessServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FineTuningStub(channel)
        bad_scale = pb.FineTuneConfig(
            base_model=TINY, output_model="bad-scale", augmentation=pb.AugmentationSpec(views=2, crop_scale_min=-0.1)
        )
        unknown = to_message(FineTuneConfig(TINY, "bad-class", class_weights={"d9": 3.0}))
        for config, words in ((bad_scale, "crop_scale"), (unknown, "'d9', which no example has")):
            requests = [pb.CreateJobRequest(config=config)] + [
                pb.CreateJobRequest(examples=pb.ExampleBatch(examples=[pb.Example(image=b"not an image", label=label)]))
                for label in ("d0", "d1")
            ]
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateJob(iter(requests))
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert words in str(caught.value.details())
            assert "not a decodable image" not in str(caught.value.details())  # no image was read


def test_the_consoles_jobs_view_shows_the_figures(
    server: InProcessServer, chromium: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The Jobs view of the web console, in Chromium: a job's per-class table and confusion matrix."""
    config = FineTuneConfig(TINY, "digits-console-figures", epochs=2, validation_fraction=0.25, class_weights="auto")
    with Client(server.target, timeout=60) as client:
        result = client.fine_tune(config, digit_examples())
    assert result.succeeded, result.job.error
    page = Page(chromium, server, tmp_path_factory.mktemp("screenshots"))
    page.open("jobs")
    page.wait(lambda d: result.job.id in d.find_element("id", "jobs-body").text)
    row = next(r for r in page.all("#jobs-body tr") if r.get_attribute("data-job") == result.job.id)
    row.find_element("css selector", "button").click()
    page.wait(lambda d: d.find_element("id", "jobs-detail").is_displayed())
    rows = page.all("#jobs-class-table tbody tr")
    assert [cell(r, "th") for r in rows] == ["d0", "d1", "d7"]
    shown = [[c.text for c in r.find_elements("css selector", "td")] for r in rows]
    figures = result.job.metrics.class_metrics
    expected = [[f"{c.precision * 100:.1f}%", f"{c.recall * 100:.1f}%", str(c.support)] for c in figures]
    assert shown == expected
    cells = page.all("#jobs-confusion td.confusion")
    matrix = result.job.metrics.confusion_matrix()
    assert [int(c.text) for c in cells] == [count for line in matrix for count in line]
    assert sum(map(sum, matrix)) == 15
    assert "Class weights: auto" in page.text("jobs-classes")
    page.no_alert()
