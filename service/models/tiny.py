"""``tiny``: a network of a few thousand parameters, for tests and for measuring the protocol alone
(``bench/ceiling.py``: its forward pass costs microseconds, as Triton's identity models are used).

It has AlexNet's shape (``features``, ``avgpool``, ``classifier``), so the registry's own feature
and classifier extractors apply, and AlexNet's weights metadata: its preprocessing (224 crop) and
its 1,000 ImageNet categories. It is never served unless named (``--models tiny``) and has no
pretrained weights: ``--weights random`` gives it the seeded initialization every model gets.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models import AlexNet_Weights

from service.errors import WeightsUnavailableError
from service.models.blocks import TINY_BLOCKS, tiny_blocks
from service.models.registry import classifier_features, last_classifier_layer, register_model

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
        logits: torch.Tensor = self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
        return logits


@register_model(
    TINY,
    weights=AlexNet_Weights.DEFAULT,
    features=classifier_features,
    feature_dim=TINY_FEATURE_DIM,
    classifier=last_classifier_layer,
    blocks=tiny_blocks,
    block_names=TINY_BLOCKS,
)
def tiny(**kwargs: Any) -> torch.nn.Module:
    if kwargs.get("weights") is not None:
        raise WeightsUnavailableError(
            "the tiny model has no pretrained weights (it is for tests and benchmarks); serve it with --weights random"
        )
    return TinyNet()
