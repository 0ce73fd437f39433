"""Head modules a job can train. Built from a :class:`HeadConfig`; never from client code."""

from __future__ import annotations

import torch
from torch import nn

from vision_client.protocol import HeadConfig


class ParallelBlock(nn.Module):
    """Two Linears side by side; their elementwise product, clamped at zero."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.left = nn.Linear(in_features, out_features)
        self.right = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.left(x) * self.right(x), min=0)


def build_head(head: HeadConfig, in_features: int, out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Dropout(head.dropout)] if head.dropout > 0 else []
    if head.kind == "linear":
        layers.append(nn.Linear(in_features, out_features))
    elif head.kind == "two_layer":
        layers += [nn.Linear(in_features, head.hidden), nn.ReLU(), nn.Linear(head.hidden, out_features)]
    elif head.kind == "parallel":
        width = in_features
        for _ in range(head.blocks):
            layers.append(ParallelBlock(width, head.hidden))
            width = head.hidden
        layers.append(nn.Linear(width, out_features))
    else:
        raise ValueError(f"unknown head kind {head.kind!r}")
    return nn.Sequential(*layers)


class StandardizedHead(nn.Module):
    """A head that works on standardized features (and, for regression, targets).

    Features are standardized with training-set statistics, so that the head
    trains well whatever the scale of the backbone's features (random or
    pretrained weights). Regression heads also learn standardized targets and
    map their outputs back. The statistics are buffers, saved with the weights.
    """

    mean: torch.Tensor
    std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(
        self,
        head: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        target_mean: torch.Tensor | None = None,
        target_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())
        self.register_buffer("target_mean", _or(target_mean, torch.zeros(())))
        self.register_buffer("target_std", _or(target_std, torch.ones(())))

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        """The head's output on the standardized scale (what training fits)."""
        output: torch.Tensor = self.head((features - self.mean) / self.std)
        return output

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.standardized(features) * self.target_std + self.target_mean


def _or(value: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return (default if value is None else value).detach().clone().float()


def build_standardized_head(
    head: HeadConfig, in_features: int, out_features: int, *, regression: bool = False
) -> StandardizedHead:
    """An untrained head with identity statistics, ready for ``load_state_dict``."""
    targets = (torch.zeros(out_features), torch.ones(out_features)) if regression else (None, None)
    return StandardizedHead(
        build_head(head, in_features, out_features), torch.zeros(in_features), torch.ones(in_features), *targets
    )
