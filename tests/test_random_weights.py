"""``--weights random`` gives every built-in model sane answers: logits of a few units whose top
class depends on the image, and features on which a head separates simple shapes."""

from __future__ import annotations

import random
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from service.models import WeightsSource, build_model, get_model_spec

MODELS = ["alexnet", "vgg16", "resnet101"]


@cache
def random_model(name: str) -> torch.nn.Module:
    return build_model(get_model_spec(name), WeightsSource.parse("random"))


def shape(kind: str, rng: random.Random) -> Image.Image:
    """A black disc or square on white, of a random size and place."""
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    r, x, y = rng.randint(40, 70), rng.randint(90, 134), rng.randint(90, 134)
    (draw.ellipse if kind == "disc" else draw.rectangle)((x - r, y - r, x + r, y + r), fill="black")
    return image


def images(photos: dict[str, bytes]) -> list[Image.Image]:
    import io

    rng = random.Random(1)
    found = [Image.open(io.BytesIO(data)).convert("RGB") for data in photos.values()]
    found += [Image.new("RGB", (256, 256), colour) for colour in ("red", "blue", "white", "black")]
    return found + [shape(kind, rng) for kind in ("disc", "square")]


@pytest.mark.parametrize("name", MODELS)
def test_logits_are_a_few_units_and_the_top_class_depends_on_the_image(name: str, photos: dict[str, bytes]) -> None:
    spec = get_model_spec(name)
    batch = torch.stack([spec.transforms()(image) for image in images(photos)])
    with torch.inference_mode():
        logits = random_model(name)(batch)
    assert torch.isfinite(logits).all()
    assert logits.abs().max() < 50, logits.abs().amax(1)  # 1e5 before calibration (ResNet101)
    assert logits.abs().amax(1).min() > 0.5  # not flat either (VGG16's were 0.1)
    tops = logits.argmax(1).tolist()
    assert len(set(tops)) >= 3, tops  # one class for every image before (ResNet101, VGG16)
    assert logits.softmax(1).amax(1).max() < 0.99  # no "spider monkey, 1.000"


@pytest.mark.parametrize("name", ["alexnet", "resnet101"])
def test_a_head_separates_discs_from_squares_on_the_features(name: str) -> None:
    from sklearn.linear_model import LogisticRegression

    spec = get_model_spec(name)
    rng = random.Random(0)
    kinds = ["disc", "square"] * 16
    batch = torch.stack([spec.transforms()(shape(kind, rng)) for kind in kinds])
    with torch.inference_mode():
        features = spec.features(random_model(name))(batch).numpy()
    labels = np.array([kind == "disc" for kind in kinds])
    train, test = slice(0, 20), slice(20, None)
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    head = LogisticRegression(max_iter=2000).fit((features[train] - mean) / std, labels[train])
    assert head.score((features[test] - mean) / std, labels[test]) >= 0.9


def test_random_weights_are_the_same_for_every_build() -> None:
    spec = get_model_spec("resnet101")
    first = random_model("resnet101").state_dict()
    second = build_model(spec, WeightsSource.parse("random")).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
