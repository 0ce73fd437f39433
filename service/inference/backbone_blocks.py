"""The blocks of each built-in model's backbone, by name, first to last: where a fine-tuning job may
cut it to train its last part (``train_backbone_blocks``).

Torch-free, so that processes that never import torch (the protocol front ends, which serve the
console's page) can say them; :mod:`service.models.blocks` splits the networks at them.
"""

from __future__ import annotations

BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "alexnet": ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"),
    "vgg16": ("stage1", "stage2", "stage3", "stage4", "stage5", "fc6", "fc7"),
    "resnet101": ("layer1", "layer2", "layer3", "layer4"),
    "tiny": ("conv", "fc"),
}
