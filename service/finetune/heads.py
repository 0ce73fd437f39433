"""Head modules a job can train, built from a :class:`HeadConfig`'s layer list (the protocol's one
vocabulary, :data:`~vision_client.protocol.LAYER_KINDS`) with our own module classes: never from
client code, never unpickled. The same config always builds the same module, so a manifest's head
(stored as data) and its safetensors weights make the served model again.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from service.models import get_model_spec
from service.models.blocks import Backbone, empty_trained_part
from vision_client.protocol import HeadConfig, Layer


class Parallel(nn.Module):
    """Branches run on the same input; their outputs (of one width) multiplied elementwise
    (``product``) or added (``sum``). Today's ``parallel`` preset is this block of two Linears
    followed by a ReLU (the product clamped at zero)."""

    def __init__(self, branches: list[nn.Sequential], combine: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = [branch(x) for branch in self.branches]
        result = outputs[0]
        for output in outputs[1:]:
            result = result * output if self.combine == "product" else result + output
        return result


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose training masks come from ``generator`` when one is set: the trainer's own
    seeded stream (:mod:`service.finetune.trainer`), so that a job's draws are its own whatever else
    the process does meanwhile (building any network, another job) with torch's global generator.
    The masks are torch's own (Bernoulli of 1 - p, outputs scaled by 1 / (1 - p)); without a
    generator, and when not training, it is ``nn.Dropout``."""

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = 1.0 - self.p
        if keep == 0:
            return torch.zeros_like(x)
        mask = torch.empty_like(x).bernoulli_(keep, generator=self.generator).div_(keep)
        return x * mask


class BatchNorm(nn.BatchNorm1d):
    """Batch normalisation that takes a training batch of one example (the last of an epoch may
    be one) with its running statistics, as serving does, where torch's would raise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        output: torch.Tensor = super().forward(x)
        return output


def build_layers(layers: tuple[Layer, ...], width: int) -> tuple[list[nn.Module], int]:
    """The modules of ``layers`` on inputs ``width`` wide, and the width of their output.

    The limits (:func:`service.finetune.spec.check_head`) are checked before; a parallel block
    whose branches end in different widths is a ValueError here too."""
    modules: list[nn.Module] = []
    for layer in layers:
        if layer.kind == "linear":
            modules.append(nn.Linear(width, layer.width))
            width = layer.width
        elif layer.kind == "relu":
            modules.append(nn.ReLU())
        elif layer.kind == "gelu":
            modules.append(nn.GELU())
        elif layer.kind == "dropout":
            modules.append(Dropout(layer.p))
        elif layer.kind == "batch_norm":
            modules.append(BatchNorm(width))
        elif layer.kind == "layer_norm":
            modules.append(nn.LayerNorm(width))
        elif layer.kind == "parallel":
            built = [build_layers(branch, width) for branch in layer.branches]
            widths = {out for _, out in built}
            if len(widths) != 1:
                raise ValueError(f"a parallel block's branches end in different widths: {sorted(widths)}")
            modules.append(Parallel([nn.Sequential(*branch) for branch, _ in built], layer.combine))
            (width,) = widths
        else:
            raise ValueError(f"unknown layer kind {layer.kind!r}")
    return modules, width


def build_head(head: HeadConfig, in_features: int, out_features: int) -> nn.Sequential:
    """The head's layers (:meth:`HeadConfig.layer_list`), then a Linear to ``out_features``."""
    modules, width = build_layers(head.layer_list(), in_features)
    return nn.Sequential(*modules, nn.Linear(width, out_features))


def upgrade_state(head: HeadConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights a server wrote before heads were layer lists, under the names the same head has now.

    Only the ``parallel`` preset's names changed: its blocks were one module each
    (``head.<i>.left`` and ``.right``); now each is a :class:`Parallel` of two branches and a ReLU.
    Linear and two_layer heads had the names they have now. Other state is returned as it is.
    """
    if head.kind != "parallel" or not any(".left." in key for key in state):
        return state
    offset = 1 if head.dropout > 0 else 0  # the input's dropout came first
    names: dict[str, str] = {}
    for block in range(head.blocks):
        for branch, side in enumerate(("left", "right")):
            for tensor in ("weight", "bias"):
                names[f"head.{offset + block}.{side}.{tensor}"] = (
                    f"head.{offset + 2 * block}.branches.{branch}.0.{tensor}"
                )
    for tensor in ("weight", "bias"):
        names[f"head.{offset + head.blocks}.{tensor}"] = f"head.{offset + 2 * head.blocks}.{tensor}"
    return {names.get(key, key): value for key, value in state.items()}


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


class TrainedPart(StandardizedHead):
    """What a job with trained backbone blocks trains: those blocks (``blocks``, a
    :class:`~service.models.blocks.Backbone` of them), then the head on their standardized output.

    Its input is the activations where the blocks were cut off from the frozen prefix; its state is
    the head's, under the names a head's has, and the blocks' under ``blocks.``. :meth:`top` is the
    head alone, which a served whole network runs after its backbone.
    """

    def __init__(
        self,
        blocks: nn.Module,
        head: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        target_mean: torch.Tensor | None = None,
        target_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__(head, mean, std, target_mean, target_std)
        self.blocks = blocks

    def standardized(self, activations: torch.Tensor) -> torch.Tensor:
        return super().standardized(self.blocks(activations))

    def top(self) -> StandardizedHead:
        """The head and its statistics without the blocks (sharing the head's parameters)."""
        return StandardizedHead(self.head, self.mean, self.std, self.target_mean, self.target_std).eval()


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


def trained_blocks(head: StandardizedHead) -> int:
    """How many backbone blocks ``head`` trained with it (0: a head on a frozen backbone)."""
    if isinstance(head, TrainedPart) and isinstance(head.blocks, Backbone):
        return len(head.blocks.blocks)
    return 0


def build_trained_part(
    base: str, trained: int, head: HeadConfig, in_features: int, out_features: int, *, regression: bool = False
) -> TrainedPart:
    """An untrained :class:`TrainedPart`: built-in ``base``'s last ``trained`` blocks (their tensors
    allocated, not set) and ``head`` with identity statistics, ready for ``load_state_dict``."""
    plain = build_standardized_head(head, in_features, out_features, regression=regression)
    part = TrainedPart(
        empty_trained_part(get_model_spec(base), trained), plain.head, plain.mean, plain.std,
        plain.target_mean, plain.target_std,
    )  # fmt: skip
    return part.eval()
