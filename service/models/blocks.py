"""A backbone's blocks: where a fine-tuning job may cut a network to train its last part.

Each built-in model says once (``register_model(blocks=..., block_names=...)``) how its backbone (``spec.features``:
the network minus its last layer) splits into a *stem* and an ordered list of *blocks*, so that
``stem`` then every block, in order, is the backbone. A job with ``train_backbone_blocks`` = k
trains the last k blocks with its head; everything before them (the *prefix*: the stem and the
other blocks) stays frozen and runs once per image.

The blocks, by model (``ModelSpec.block_names``, first to last):

- AlexNet: its five convolutions, each with its ReLU and pooling (``conv1`` ... ``conv5``), then
  the classifier's two hidden Linear layers with their dropout and ReLU (``fc6``, ``fc7``); the
  adaptive pooling and the flattening open ``fc6``. Seven blocks.
- VGG16: its five convolution stages, each up to its max pooling (``stage1`` ... ``stage5``), then
  ``fc6`` and ``fc7`` as AlexNet's. Seven blocks.
- ResNet101: ``layer1`` ... ``layer4``, the pooling and flattening closing ``layer4``; the stem is
  the first convolution, its normalisation, ReLU and max pooling. Four blocks.
- tiny: its convolution (``conv``), then its pooling and hidden Linear (``fc``). Two blocks.

The last blocks are always the ones directly below the head, so a trained block never feeds a
frozen one: on AlexNet and VGG16, k = 1 trains ``fc7``, k = 2 ``fc6`` and ``fc7``, k = 3 also the
last convolution stage. The blocks are the network's own modules (a split shares its parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.errors import InvalidInputError, quote
from service.inference.backbone_blocks import BLOCK_NAMES

if TYPE_CHECKING:
    from service.models.registry import ModelSpec

Split = tuple[nn.Module, list[nn.Module]]  # (stem, blocks)
BlockSplitter = Callable[[nn.Module], Split]

ALEXNET_BLOCKS = BLOCK_NAMES["alexnet"]
VGG_BLOCKS = BLOCK_NAMES["vgg16"]
RESNET_BLOCKS = BLOCK_NAMES["resnet101"]
TINY_BLOCKS = BLOCK_NAMES["tiny"]


def _child(net: nn.Module, name: str) -> nn.Sequential:
    child = net.get_submodule(name)
    if not isinstance(child, nn.Sequential):
        raise TypeError(f"{type(net).__name__}.{name} is a {type(child).__name__}, expected a Sequential")
    return child


def _fully_connected(net: nn.Module, hidden: list[tuple[int, int]]) -> list[nn.Module]:
    """AlexNet and VGG: the classifier's hidden Linear groups (``hidden``: index ranges of
    ``classifier``), the pooling and the flattening opening the first."""
    classifier = _child(net, "classifier")
    (start, end), *rest = hidden
    first = nn.Sequential(net.get_submodule("avgpool"), nn.Flatten(1), *classifier[start:end])
    return [first, *(classifier[a:b] for a, b in rest)]


def _stages(features: nn.Sequential, ends: list[int]) -> list[nn.Module]:
    """``features`` cut after each index of ``ends`` (each stage ends there, inclusive)."""
    starts = [0, *(end + 1 for end in ends[:-1])]
    return [features[start : end + 1] for start, end in zip(starts, ends, strict=True)]


def alexnet_blocks(net: nn.Module) -> Split:
    features = _child(net, "features")
    convolutions = _stages(features, [2, 5, 7, 9, 12])  # each conv with its ReLU (and pooling)
    return nn.Identity(), [*convolutions, *_fully_connected(net, [(0, 3), (3, 6)])]


def vgg_blocks(net: nn.Module) -> Split:
    features = _child(net, "features")
    pools = [i for i, module in enumerate(features) if isinstance(module, nn.MaxPool2d)]
    return nn.Identity(), [*_stages(features, pools), *_fully_connected(net, [(0, 3), (3, 6)])]


def resnet_blocks(net: nn.Module) -> Split:
    stem = nn.Sequential(*(net.get_submodule(name) for name in ("conv1", "bn1", "relu", "maxpool")))
    layers: list[nn.Module] = [net.get_submodule(f"layer{i}") for i in (1, 2, 3)]
    last = nn.Sequential(net.get_submodule("layer4"), net.get_submodule("avgpool"), nn.Flatten(1))
    return stem, [*layers, last]


def tiny_blocks(net: nn.Module) -> Split:
    return nn.Identity(), [
        net.get_submodule("features"),
        nn.Sequential(net.get_submodule("avgpool"), nn.Flatten(1), *_child(net, "classifier")[:-1]),
    ]


class Backbone(nn.Module):
    """A backbone as its blocks' modules run it: ``stem``, then each of ``blocks``. Also a whole
    fine-tuned network's backbone: the frozen prefix, then the trained blocks."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def split_at(spec: ModelSpec, net: nn.Module, trained: int) -> tuple[Backbone, Backbone]:
    """(prefix, trained part) of ``net``'s backbone (``net`` is ``spec``'s network): the last ``trained``
    blocks, and what comes before them. Both share ``net``'s parameters; the trained part has no stem."""
    if spec.blocks is None:
        raise ValueError(f"{spec.name} has no blocks")
    stem, blocks = spec.blocks(net)
    if not 1 <= trained <= len(blocks):
        raise ValueError(f"cannot train {trained} of {spec.name}'s {len(blocks)} blocks")
    cut = len(blocks) - trained
    return Backbone(stem, blocks[:cut]), Backbone(nn.Identity(), blocks[cut:])


def check_trained_blocks(spec: ModelSpec, trained: int) -> None:
    """:class:`InvalidInputError` unless ``spec``'s backbone has at least ``trained`` blocks (0 always fits)."""
    if trained == 0:
        return
    names = spec.block_names
    if spec.blocks is None or not names:
        raise InvalidInputError(
            f"train_backbone_blocks: {quote(spec.name)} has no blocks defined for training; use 0 (a frozen backbone)"
        )
    if trained > len(names):
        raise InvalidInputError(
            f"train_backbone_blocks {trained}: {spec.name}'s backbone has {len(names)} blocks "
            f"({', '.join(names)}, first to last); choose 0 (a frozen backbone) to {len(names)}"
        )


def _meta_split(spec: ModelSpec, trained: int) -> tuple[Backbone, Backbone]:
    """``spec``'s network split, built on the meta device: shapes without memory or arithmetic."""
    with torch.device("meta"):
        return split_at(spec, spec.builder(weights=None), trained)


@cache
def cut_shape(spec: ModelSpec, trained: int) -> tuple[int, ...]:
    """The shape of one image's activations where ``trained`` blocks are cut off (what a job keeps
    per image and view), from a forward pass on the meta device."""
    prefix, _ = _meta_split(spec, trained)
    with torch.device("meta"):
        output = prefix(torch.empty(1, 3, spec.crop_size, spec.crop_size))
    return tuple(int(size) for size in output.shape[1:])


@cache
def trained_state_bytes(spec: ModelSpec, trained: int) -> int:
    """Bytes of the last ``trained`` blocks' state: float32 weights, normalisations' statistics."""
    _, part = _meta_split(spec, trained)
    return sum(value.numel() * value.element_size() for value in part.state_dict().values())


def empty_trained_part(spec: ModelSpec, trained: int) -> Backbone:
    """The last ``trained`` blocks' modules with their tensors allocated on the CPU but not set, for
    ``load_state_dict``: the rest of the network is never allocated."""
    _, part = _meta_split(spec, trained)
    return part.to_empty(device="cpu").eval()
