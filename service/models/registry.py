"""The built-in models, described together with their torchvision weights.

As in torchvision's ``models/_api.py``, a model is a builder plus a weights
entry whose metadata carries everything serving needs: the exact
preprocessing (``weights.transforms()``), the category labels and the
smallest input the network accepts. Weights other than the pretrained ones
(random, or a user's state dict) reuse that metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import models as tv_models
from torchvision.models import AlexNet_Weights, ResNet101_Weights, VGG16_Weights, WeightsEnum

from service.errors import ModelNotFoundError
from service.models.blocks import (
    ALEXNET_BLOCKS,
    RESNET_BLOCKS,
    VGG_BLOCKS,
    BlockSplitter,
    alexnet_blocks,
    resnet_blocks,
    vgg_blocks,
)

Builder = Callable[..., torch.nn.Module]
FeatureExtractor = Callable[[torch.nn.Module], torch.nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A servable architecture and the weights whose metadata it serves with."""

    name: str
    builder: Builder
    weights: WeightsEnum
    features: FeatureExtractor  # the network minus its last layer, sharing its parameters
    feature_dim: int
    classifier: FeatureExtractor  # the last layer: logits = classifier(features(x))
    blocks: BlockSplitter | None = None  # the backbone as a stem and blocks (service.models.blocks)
    block_names: tuple[str, ...] = ()  # the blocks', first to last

    @property
    def categories(self) -> list[str]:
        return list(self.weights.meta["categories"])

    @property
    def num_classes(self) -> int:
        return len(self.weights.meta["categories"])

    @property
    def min_size(self) -> tuple[int, int]:
        """Smallest (height, width) of a ``PIXELS`` input the network accepts."""
        height, width = self.weights.meta["min_size"]
        return (height, width)

    @property
    def crop_size(self) -> int:
        """Side of the square the preprocessing produces from an encoded image."""
        return int(self.weights.transforms().crop_size[0])

    @property
    def multiply_adds_per_weight_byte(self) -> float:
        """Multiply-adds of one image's forward pass per byte of its float32 weights: how much work
        reading the weights once buys (torchvision's metadata: ``_ops``, in billions, and ``num_params``)."""
        return float(self.weights.meta["_ops"]) * 1e9 / (4 * int(self.weights.meta["num_params"]))

    def transforms(self) -> Callable[[Any], torch.Tensor]:
        """The exact preprocessing of the pretrained weights (PIL image -> CHW float)."""
        transforms: Callable[[Any], torch.Tensor] = self.weights.transforms()
        return transforms

    def build(self, *, pretrained: bool, progress: bool = False) -> torch.nn.Module:
        return self.builder(weights=self.weights if pretrained else None, progress=progress)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    weights: WeightsEnum,
    features: FeatureExtractor,
    feature_dim: int,
    classifier: FeatureExtractor,
    blocks: BlockSplitter | None = None,
    block_names: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Register ``builder`` as a built-in model served under ``name``; ``blocks`` splits its backbone
    into the blocks a fine-tuning job may train (named ``block_names``)."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            weights=weights,
            features=features,
            feature_dim=feature_dim,
            classifier=classifier,
            blocks=blocks,
            block_names=block_names,
        )
        return builder

    return wrap


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelNotFoundError(f"unknown model {name!r}; built-in models are: {known}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _sequential(net: torch.nn.Module, name: str) -> torch.nn.Sequential:
    """The ``torch.nn.Sequential`` child ``name`` of ``net`` (``Module.__getattr__`` is typed ``Tensor | Module``)."""
    child = net.get_submodule(name)
    if not isinstance(child, torch.nn.Sequential):
        raise TypeError(f"{type(net).__name__}.{name} is a {type(child).__name__}, expected a Sequential")
    return child


def classifier_features(net: torch.nn.Module) -> torch.nn.Module:
    """AlexNet and VGG: everything up to the last Linear of ``classifier`` (post-ReLU features)."""
    return torch.nn.Sequential(
        net.get_submodule("features"),
        net.get_submodule("avgpool"),
        torch.nn.Flatten(1),
        _sequential(net, "classifier")[:-1],
    )


def last_classifier_layer(net: torch.nn.Module) -> torch.nn.Module:
    """AlexNet and VGG: the last Linear of ``classifier``."""
    return _sequential(net, "classifier")[-1]


def resnet_fc(net: torch.nn.Module) -> torch.nn.Module:
    return net.get_submodule("fc")


def resnet_features(net: torch.nn.Module) -> torch.nn.Module:
    """ResNet: the pooled output that ``fc`` reads."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    return torch.nn.Sequential(*(net.get_submodule(name) for name in names), torch.nn.Flatten(1))


@register_model(
    "alexnet",
    weights=AlexNet_Weights.DEFAULT,
    features=classifier_features,
    feature_dim=4096,
    classifier=last_classifier_layer,
    blocks=alexnet_blocks,
    block_names=ALEXNET_BLOCKS,
)
def alexnet(**kwargs: Any) -> torch.nn.Module:
    net: torch.nn.Module = tv_models.alexnet(**kwargs)  # torchvision's builders are untyped
    return net


@register_model(
    "vgg16",
    weights=VGG16_Weights.DEFAULT,
    features=classifier_features,
    feature_dim=4096,
    classifier=last_classifier_layer,
    blocks=vgg_blocks,
    block_names=VGG_BLOCKS,
)
def vgg16(**kwargs: Any) -> torch.nn.Module:
    net: torch.nn.Module = tv_models.vgg16(**kwargs)  # torchvision's builders are untyped
    return net


@register_model(
    "resnet101",
    weights=ResNet101_Weights.DEFAULT,
    features=resnet_features,
    feature_dim=2048,
    classifier=resnet_fc,
    blocks=resnet_blocks,
    block_names=RESNET_BLOCKS,
)
def resnet101(**kwargs: Any) -> torch.nn.Module:
    net: torch.nn.Module = tv_models.resnet101(**kwargs)  # torchvision's builders are untyped
    return net
