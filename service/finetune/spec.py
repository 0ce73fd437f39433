"""A fine-tuning job's configuration, validated once when the job is created."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from service.errors import InvalidInputError
from vision_client._config import HEAD_KINDS, LOSSES
from vision_client._config import OPTIMIZER_KINDS as OPTIMIZERS

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


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


@dataclass(frozen=True)
class Limits:
    """What one job may ask for."""

    max_examples: int = 20_000
    max_total_bytes: int = 1 << 30
    max_epochs: int = 1_000
    max_hidden: int = 8_192
    max_blocks: int = 8
    max_batch_size: int = 4_096
    max_target_size: int = 1_024


def validate_model_name(name: str, field_name: str = "output_model") -> str:
    if not MODEL_NAME.match(name):
        raise InvalidInputError(
            f"{field_name} {name!r} is not a valid model name: use 1 to 63 lowercase letters, digits, "
            "'_', '-' or '.', starting with a letter or digit"
        )
    return name


def validate_spec(spec: FineTuneSpec, limits: Limits) -> FineTuneSpec:
    """Check everything that can be checked before any example arrives."""
    if not spec.base_model:
        raise InvalidInputError("base_model is empty: name the served model to build on, e.g. 'resnet101'")
    validate_model_name(spec.output_model)
    if spec.head.kind not in HEAD_KINDS:
        raise InvalidInputError(f"head {spec.head.kind!r} is unknown; choose one of {', '.join(HEAD_KINDS)}")
    if not 1 <= spec.head.hidden <= limits.max_hidden:
        raise InvalidInputError(f"head hidden size must be between 1 and {limits.max_hidden}, got {spec.head.hidden}")
    if not 1 <= spec.head.blocks <= limits.max_blocks:
        raise InvalidInputError(f"head blocks must be between 1 and {limits.max_blocks}, got {spec.head.blocks}")
    if not 0.0 <= spec.head.dropout < 1.0:
        raise InvalidInputError(f"head dropout must be in [0, 1), got {spec.head.dropout}")
    opt = spec.optimizer
    if opt.kind not in OPTIMIZERS:
        raise InvalidInputError(f"optimizer {opt.kind!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if not 0.0 < opt.lr <= 10.0:
        raise InvalidInputError(f"learning rate must be in (0, 10], got {opt.lr}")
    if not 0.0 <= opt.momentum < 1.0:
        raise InvalidInputError(f"momentum must be in [0, 1), got {opt.momentum}")
    if opt.weight_decay < 0:
        raise InvalidInputError(f"weight decay must not be negative, got {opt.weight_decay}")
    if not all(0.0 <= b < 1.0 for b in opt.betas):
        raise InvalidInputError(f"Adam betas must be in [0, 1), got {opt.betas}")
    if spec.loss not in LOSSES:
        raise InvalidInputError(f"loss {spec.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
    if not 1 <= spec.epochs <= limits.max_epochs:
        raise InvalidInputError(f"epochs must be between 1 and {limits.max_epochs}, got {spec.epochs}")
    if not 1 <= spec.batch_size <= limits.max_batch_size:
        raise InvalidInputError(f"batch_size must be between 1 and {limits.max_batch_size}, got {spec.batch_size}")
    if not 0.0 <= spec.validation_fraction < 1.0:
        raise InvalidInputError(f"validation_fraction must be in [0, 1), got {spec.validation_fraction}")
    if spec.early_stopping_patience < 0:
        raise InvalidInputError("early_stopping_patience must not be negative")
    return spec
