"""A tiny built-in model for the fast test tier: the real serving path on a network of a few
thousand parameters.

Importing this module registers ``tiny`` in the model registry of the test process (the
registry of :mod:`service.models` is the very one the server uses). It has AlexNet's shape
(``features``, ``avgpool``, ``classifier``), so the registry's own feature and classifier
extractors apply, and it borrows AlexNet's weights metadata: its preprocessing (224 crop)
and its 1,000 ImageNet categories. ``--weights random`` fills it with the seeded
initialization every built-in model gets; it builds and runs in milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models import AlexNet_Weights

from service.models import list_models, register_model
from service.models.registry import classifier_features, last_classifier_layer

TINY = "tiny"
TINY_FEATURE_DIM = 16


class TinyNet(torch.nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, kernel_size=16, stride=16), torch.nn.ReLU())
        self.avgpool = torch.nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(16, TINY_FEATURE_DIM), torch.nn.ReLU(), torch.nn.Linear(TINY_FEATURE_DIM, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny(**kwargs: Any) -> torch.nn.Module:
    if kwargs.get("weights") is not None:
        raise ValueError("the tiny test model has no pretrained weights; use --weights random")
    return TinyNet()


if TINY not in list_models():
    register_model(
        TINY,
        weights=AlexNet_Weights.DEFAULT,
        features=classifier_features,
        feature_dim=TINY_FEATURE_DIM,
        classifier=last_classifier_layer,
    )(tiny)
