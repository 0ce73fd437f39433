"""Jobs that train the last blocks of their base model's backbone (``train_backbone_blocks``).

The blocks are each model's own (:mod:`service.models.blocks`). Such a job cuts the base network
before its last k blocks: the frozen *prefix* runs once per image (and augmented view), through
the batched path, and the job keeps its activations; the blocks and the head then train on them
(:func:`service.finetune.trainer.train_head` with a ``trunk``). The model served is the whole new
network, :class:`FineTunedNetwork`: the prefix with the base's weights, then the trained blocks,
then the head, built from our module classes and exported to the runtime like a built-in model.

Here: the checks of a config's blocks against the base model (before any example), what keeping
the activations costs, and the served network's assembly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.errors import InvalidInputError
from service.finetune.heads import TrainedPart
from service.models import ModelSpec, get_model_spec, list_models
from service.models.blocks import Backbone, check_trained_blocks, cut_shape, split_at
from vision_client.protocol import FineTuneConfig

if TYPE_CHECKING:
    from service.engine.factory import ModelFactory
    from service.engine.served import ServedModel

# What a job may keep of activations at its cut (as float16: 2 bytes a value): 2 GiB holds
# ResNet101's before layer4 (1024 x 14 x 14) for 5,350 images, AlexNet's before fc6 for 116,000.
MAX_ACTIVATION_BYTES = 2 * 1024**3
ACTIVATION_BYTES_PER_VALUE = 2
MAX_BLOCK_LEARNING_RATE = 10.0  # the optimizer's lr times backbone_lr_factor (spec.MAX_LEARNING_RATE's bound)


def check_backbone(config: FineTuneConfig) -> None:
    """The trained blocks of ``config`` against its base model (INVALID_ARGUMENT before any
    example): at most the backbone's blocks, and a blocks' learning rate within bounds. A base
    model that is not built in is left to the caller's check of the base model."""
    blocks = config.train_backbone_blocks
    if not blocks or config.base_model not in list_models():
        return
    check_trained_blocks(get_model_spec(config.base_model), blocks)
    rate = config.optimizer.lr * config.backbone_lr_factor
    if rate > MAX_BLOCK_LEARNING_RATE:
        raise InvalidInputError(
            f"the trained blocks' learning rate, lr {config.optimizer.lr:g} x backbone_lr_factor "
            f"{config.backbone_lr_factor:g} = {rate:g}, must be at most {MAX_BLOCK_LEARNING_RATE:g}; "
            "lower backbone_lr_factor"
        )


def activation_values(config: FineTuneConfig) -> int:
    """Values a job of ``config`` keeps per example at its cut (each view's too); 0 for a frozen
    backbone or a base model that is not built in."""
    if not config.train_backbone_blocks or config.base_model not in list_models():
        return 0
    spec = get_model_spec(config.base_model)
    if config.train_backbone_blocks > len(spec.block_names):
        return 0  # refused by check_backbone
    return math.prod(cut_shape(spec, config.train_backbone_blocks)) * (1 + config.augmentation.views)


def max_examples_at_cut(config: FineTuneConfig) -> int | None:
    """Examples a job of ``config`` may bring for its activations to fit :data:`MAX_ACTIVATION_BYTES`;
    None for a frozen backbone."""
    values = activation_values(config)
    if not values:
        return None
    return max(1, MAX_ACTIVATION_BYTES // (values * ACTIVATION_BYTES_PER_VALUE))


def activations_limit_message(config: FineTuneConfig) -> str:
    """Why a job of ``config`` takes at most :func:`max_examples_at_cut` examples, and what to do."""
    spec = get_model_spec(config.base_model)
    shape = " x ".join(map(str, cut_shape(spec, config.train_backbone_blocks)))
    views = config.augmentation.views
    return (
        f"training {config.train_backbone_blocks} blocks of {spec.name} keeps {shape} activations per image"
        + (f" and per each of its {views} augmented views" if views else "")
        + f", so a job takes at most {max_examples_at_cut(config)} examples ({MAX_ACTIVATION_BYTES // 1024**3} GiB "
        "of activations); send fewer examples, train fewer blocks, or ask for fewer views"
    )


def trained_part(config: FineTuneConfig, network: nn.Module) -> tuple[Backbone, Backbone]:
    """(prefix, blocks to train) of ``network``, the base model's network of ``config`` (sharing it)."""
    return split_at(get_model_spec(config.base_model), network, config.train_backbone_blocks)


class FineTunedNetwork(nn.Module):
    """A whole fine-tuned network: ``features`` (the frozen prefix, then the trained blocks), then
    ``classifier`` (the head on their standardized output). Served and exported as a built-in
    network is: :func:`served_spec` says how it splits."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(pixels))
        return logits


def _features(net: nn.Module) -> nn.Module:
    return net.get_submodule("features")


def _classifier(net: nn.Module) -> nn.Module:
    return net.get_submodule("classifier")


def whole_network(name: str, base: str, network: nn.Module, part: TrainedPart) -> tuple[ModelSpec, FineTunedNetwork]:
    """The network served as ``name``: ``part`` (trained blocks and head) on built-in ``base``'s
    ``network`` (a copy of its own, with its served weights, whose own last blocks are dropped),
    and the spec it is built and exported by."""
    spec = get_model_spec(base)
    blocks = part.blocks
    if not isinstance(blocks, Backbone):
        raise TypeError(f"trained blocks are a Backbone, got {type(blocks).__name__}")
    prefix, _ = split_at(spec, network, len(blocks.blocks))
    net = FineTunedNetwork(nn.Sequential(prefix, blocks), part.top()).eval()
    return served_spec(spec, name), net


def served_spec(base: ModelSpec, name: str) -> ModelSpec:
    """``base``'s spec (its preprocessing and sizes) for a :class:`FineTunedNetwork` on it served as
    ``name`` (the name its exports are cached under, by their weights): its features and classifier
    are the network's own, and it has no blocks to train."""
    return dataclasses.replace(base, name=name, features=_features, classifier=_classifier, blocks=None, block_names=())


def start_network(
    factory: ModelFactory, name: str, base: ServedModel, part: TrainedPart, labels: list[str], version: str
) -> ServedModel:
    """``part`` on ``base``'s backbone, served as ``name``: the whole new network built from the
    base's weights and ``part``'s, exported and warmed up (blocking: seconds)."""
    spec, net = whole_network(name, base.name, factory.base_network(base.name), part)
    return factory.start_network(name, base, spec, net, labels, version)
