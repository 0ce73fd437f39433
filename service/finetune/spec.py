"""A fine-tuning job's configuration, validated once when the job is created.

Every number of a spec is checked before any example is streamed: floats must be
finite and in range (an infinite weight decay would train a head that serves NaN),
integers in range (the seed seeds torch generators, which take 64 bits), and the
head no larger than ``FineTuneLimits.max_head_parameters``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from service.config import FineTuneLimits
from service.errors import InvalidInputError, quote
from service.finetune.names import validate_model_name
from vision_client._config import HEAD_KINDS, LOSSES
from vision_client._config import OPTIMIZER_KINDS as OPTIMIZERS

MAX_SEED = 2**63 - 2  # the trainer seeds with seed and seed + 1; torch takes up to 2**64 - 1
MAX_LEARNING_RATE = 10.0
MAX_WEIGHT_DECAY = 1.0


@dataclass(frozen=True)
class HeadSpec:
    kind: str = "linear"
    hidden: int = 256
    blocks: int = 2
    dropout: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "hidden": self.hidden, "blocks": self.blocks, "dropout": self.dropout}


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class FineTuneSpec:
    base_model: str
    output_model: str
    head: HeadSpec = field(default_factory=HeadSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    loss: str = "cross_entropy"
    epochs: int = 10
    batch_size: int = 32
    validation_fraction: float = 0.2
    seed: int = 0
    early_stopping_patience: int = 0
    refit: bool = True  # after choosing the epoch count, train again on every example
    replace: bool = False


def head_parameters(head: HeadSpec, in_features: int, out_features: int) -> int:
    """Trainable parameters of ``head`` (weights and biases), without building it."""
    if head.kind == "linear":
        return in_features * out_features + out_features
    if head.kind == "two_layer":
        return (in_features + 1) * head.hidden + (head.hidden + 1) * out_features
    if head.kind == "parallel":
        blocks = 2 * (in_features + 1) * head.hidden + (head.blocks - 1) * 2 * (head.hidden + 1) * head.hidden
        return blocks + (head.hidden + 1) * out_features
    raise InvalidInputError(f"head {quote(head.kind)} is unknown; choose one of {', '.join(HEAD_KINDS)}")


def validate_head(head: HeadSpec, in_features: int, out_features: int, limits: FineTuneLimits) -> HeadSpec:
    """Check a head's kind and sizes, and that it stays within the parameter budget."""
    if head.kind not in HEAD_KINDS:
        raise InvalidInputError(f"head {quote(head.kind)} is unknown; choose one of {', '.join(HEAD_KINDS)}")
    _check_int("head hidden size", head.hidden, 1, limits.max_hidden)
    _check_int("head blocks", head.blocks, 1, limits.max_blocks)
    _check_float("head dropout", head.dropout, 0.0, 1.0, high_open=True)
    parameters = head_parameters(head, in_features, out_features)
    if parameters > limits.max_head_parameters:
        raise InvalidInputError(
            f"a {head.kind} head with hidden={head.hidden}, blocks={head.blocks} on {in_features} features and "
            f"{out_features} outputs has {parameters:,} parameters, over the limit of "
            f"{limits.max_head_parameters:,}; choose a smaller hidden size or fewer blocks"
        )
    return head


def validate_spec(
    spec: FineTuneSpec, limits: FineTuneLimits, *, feature_dim: int | None = None, outputs: int = 2
) -> FineTuneSpec:
    """Check everything that can be checked before any example arrives.

    ``feature_dim`` (the base model's) enables the head-size check; ``outputs`` is
    the number of classes or targets, once known (2, the least, before).
    """
    if not spec.base_model:
        raise InvalidInputError("base_model is empty: name the served model to build on, e.g. 'resnet101'")
    validate_model_name(spec.output_model)
    if spec.head.kind not in HEAD_KINDS:
        raise InvalidInputError(f"head {quote(spec.head.kind)} is unknown; choose one of {', '.join(HEAD_KINDS)}")
    if feature_dim is not None:
        validate_head(spec.head, feature_dim, outputs, limits)
    else:
        _check_int("head hidden size", spec.head.hidden, 1, limits.max_hidden)
        _check_int("head blocks", spec.head.blocks, 1, limits.max_blocks)
        _check_float("head dropout", spec.head.dropout, 0.0, 1.0, high_open=True)
    opt = spec.optimizer
    if opt.kind not in OPTIMIZERS:
        raise InvalidInputError(f"optimizer {quote(opt.kind)} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    _check_float("learning rate", opt.lr, 0.0, MAX_LEARNING_RATE, low_open=True)
    _check_float("momentum", opt.momentum, 0.0, 1.0, high_open=True)
    _check_float("weight decay", opt.weight_decay, 0.0, MAX_WEIGHT_DECAY)
    for name, beta in zip(("beta1", "beta2"), opt.betas, strict=True):
        _check_float(f"Adam {name}", beta, 0.0, 1.0, high_open=True)
    if spec.loss not in LOSSES:
        raise InvalidInputError(f"loss {quote(spec.loss)} is unknown; choose one of {', '.join(LOSSES)}")
    _check_int("epochs", spec.epochs, 1, limits.max_epochs)
    _check_int("batch_size", spec.batch_size, 1, limits.max_batch_size)
    _check_float("validation_fraction", spec.validation_fraction, 0.0, 1.0, high_open=True)
    _check_int("seed", spec.seed, 0, MAX_SEED)
    _check_int("early_stopping_patience", spec.early_stopping_patience, 0, limits.max_epochs)
    return spec


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(f"{name} must be an integer from {low} to {high}, got {quote(value)}")


def _check_float(
    name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    number = float(value)
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise InvalidInputError(f"{name} must be a finite number in {interval}, got {quote(value)}")
