"""``FineTuneConfig``: every setting of a fine-tuning job, in one frozen dataclass.

It mirrors the wire's ``vision.v1.FineTuneConfig``: the head and the optimizer are
nested dataclasses, as they are nested messages; the training settings sit on the
config itself. Each value is checked when the dataclass is made (also by
``dataclasses.replace``), so a config that exists can be sent. The checks are those
that need no server: kinds, types and ranges, and values that proto3 cannot carry
(a zero on the wire means "the server's default", so a zero learning rate would
silently become 0.001). Limits of the server's own (how many epochs it allows, the
model name pattern) are the server's to check. ``_protocol.config_message`` is the
one conversion to the message.

The kinds (``HEAD_KINDS``, ``OPTIMIZER_KINDS``, ``LOSSES``) are defined here once;
the server imports them.
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass, field
from typing import Literal, get_args

from vision_client.errors import InvalidInputError

HeadKind = Literal["linear", "two_layer", "parallel"]
OptimizerKind = Literal["adam", "sgd"]
Loss = Literal["cross_entropy", "mse"]

HEAD_KINDS: tuple[str, ...] = get_args(HeadKind)
OPTIMIZER_KINDS: tuple[str, ...] = get_args(OptimizerKind)
LOSSES: tuple[str, ...] = get_args(Loss)

_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1
_FLOAT32 = struct.Struct("<f")


@dataclass(frozen=True)
class HeadConfig:
    """The new head: ``linear``; ``two_layer`` (Linear-ReLU-Linear, ``hidden`` wide);
    ``parallel`` (``blocks`` blocks whose output is the product of two Linears clamped
    at zero, then a Linear). ``dropout`` applies to the head's input while training."""

    kind: HeadKind = "linear"
    hidden: int = 256
    blocks: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("head kind", self.kind, HEAD_KINDS)
        _set(self, "hidden", _check_count("head hidden", self.hidden))
        _set(self, "blocks", _check_count("head blocks", self.blocks))
        _set(self, "dropout", _check_fraction("head dropout", self.dropout))


@dataclass(frozen=True)
class OptimizerConfig:
    """``adam`` (``beta1``, ``beta2``) or ``sgd`` (``momentum``), with ``lr`` and ``weight_decay``."""

    kind: OptimizerKind = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        _check_choice("optimizer kind", self.kind, OPTIMIZER_KINDS)
        if not _sent("optimizer lr", self.lr) > 0:
            raise InvalidInputError(f"optimizer lr must be a positive number, got {self.lr!r}")
        _set(self, "lr", float(self.lr))
        _set(self, "momentum", _check_fraction("optimizer momentum", self.momentum))
        if _sent("optimizer weight_decay", self.weight_decay) < 0:
            raise InvalidInputError(f"optimizer weight_decay must not be negative, got {self.weight_decay!r}")
        _set(self, "weight_decay", float(self.weight_decay))
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 < _sent(f"optimizer {name}", value) < 1:
                raise InvalidInputError(
                    f"optimizer {name} must be in (0, 1), got {value!r} "
                    "(0 cannot be sent: the server reads it as its default)"
                )
            _set(self, name, float(value))


@dataclass(frozen=True)
class FineTuneConfig:
    """Every setting of a fine-tuning job; pass it to ``fine_tune`` or ``create_job``.

    ``base_model`` is the served model whose frozen backbone computes the features;
    the new head is served as ``output_model`` (``replace=True`` replaces a
    fine-tuned model of that name). ``loss`` is ``cross_entropy`` (labels are class
    names) or ``mse`` (labels are target vectors). A stratified ``validation_fraction``
    of the examples picks the best epoch (and stops early after
    ``early_stopping_patience`` epochs without a better validation loss; 0: never);
    with ``refit`` the head is then trained again on every example for that many
    epochs. ``seed`` fixes the split and the head's initial weights.

    >>> FineTuneConfig("resnet101", "pets", head=HeadConfig("two_layer", hidden=128), epochs=20)  # doctest: +SKIP
    """

    base_model: str
    output_model: str
    head: HeadConfig = field(default_factory=HeadConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: Loss = "cross_entropy"
    epochs: int = 10
    batch_size: int = 32
    validation_fraction: float = 0.2
    seed: int = 0
    early_stopping_patience: int = 0
    refit: bool = True
    replace: bool = False

    def __post_init__(self) -> None:
        for name in ("base_model", "output_model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidInputError(f"{name} must be a model name (a non-empty str), got {value!r}")
        for name, kind in (("head", HeadConfig), ("optimizer", OptimizerConfig)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                example = f"{kind.__name__}({value!r})" if isinstance(value, str) else f"{kind.__name__}(...)"
                raise InvalidInputError(f"{name} must be a {kind.__name__}, got {value!r}; e.g. {name}={example}")
        _check_choice("loss", self.loss, LOSSES)
        _set(self, "epochs", _check_count("epochs", self.epochs))
        _set(self, "batch_size", _check_count("batch_size", self.batch_size))
        _set(self, "validation_fraction", _check_fraction("validation_fraction", self.validation_fraction))
        _set(self, "seed", _check_integer("seed", self.seed, 0, _UINT64_MAX))
        patience = _check_integer("early_stopping_patience", self.early_stopping_patience, 0, _INT32_MAX)
        _set(self, "early_stopping_patience", patience)
        for name in ("refit", "replace"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _set(config: object, name: str, value: object) -> None:
    """Store a checked value as the plain Python number it is (a numpy integer becomes an int)."""
    object.__setattr__(config, name, value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{name} {value!r} is unknown; choose one of {', '.join(choices)}")


def _check_integer(name: str, value: int, low: int, high: int, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise InvalidInputError(f"{name} must be {what or f'an integer from {low} to {high}'}, got {value!r}")
    return int(value)


def _check_count(name: str, value: int) -> int:
    """A positive int32: zero would read as the server's default on the wire."""
    return _check_integer(name, value, 1, _INT32_MAX, f"a positive integer (at most {_INT32_MAX})")


def _sent(name: str, value: float) -> float:
    """The value as the wire's float32 carries it (so that 1e-50 counts as the zero it becomes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    try:
        (sent,) = _FLOAT32.unpack(_FLOAT32.pack(float(value)))
    except OverflowError:
        raise InvalidInputError(f"{name} is too large to send (a float32), got {value!r}") from None
    return float(sent)


def _check_fraction(name: str, value: float) -> float:
    if not 0 <= _sent(name, value) < 1:
        raise InvalidInputError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)
