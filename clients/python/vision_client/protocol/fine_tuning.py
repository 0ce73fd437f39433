"""``FineTuneConfig``: every setting of a fine-tuning job, in one frozen dataclass, and its
one conversion to and from the wire (``to_message``/``from_message``) and to and from JSON
(``to_dict``/``from_dict``, for job records and model manifests).

It mirrors the wire's ``vision.v1.FineTuneConfig``: the head and the optimizer are
nested dataclasses, as they are nested messages; the training settings sit on the
config itself. Each value is checked when the dataclass is made (also by
``dataclasses.replace`` and by ``from_message``), so a config that exists can be sent,
and a message the server receives is checked by the same code that checks the
client's config. The checks are those that need no server: kinds, types and ranges
(the seed is the wire's uint64), and values that proto3 cannot carry (a zero on the
wire means "the server's default", so a zero learning rate would silently become
0.001). Limits of a server's own (how many epochs it allows, the model name pattern,
the head's size) are the server's to check.

The kinds (``HEAD_KINDS``, ``OPTIMIZER_KINDS``, ``LOSSES``) are defined here once.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from vision_client.errors import InvalidInputError
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb

HeadKind = Literal["linear", "two_layer", "parallel"]
OptimizerKind = Literal["adam", "sgd"]
Loss = Literal["cross_entropy", "mse"]

HEAD_KINDS: tuple[str, ...] = get_args(HeadKind)
OPTIMIZER_KINDS: tuple[str, ...] = get_args(OptimizerKind)
LOSSES: tuple[str, ...] = get_args(Loss)

_INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1  # the wire's seed
_SHOWN_CHARS = 80  # of a bad value in an error message
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
class AugmentationConfig:
    """Random views of the training images, for a head on a frozen backbone.

    The backbone's features of ``views`` random views of each example are computed once,
    before training, through the same batched path as the examples' own (so a job computes
    ``1 + views`` times the features, and holds them); each epoch then trains on one view of
    each example, its own image among them, drawn from the job's seed. A view is a random
    resized ``crop`` (a part of ``crop_scale[0]`` to ``crop_scale[1]`` of the image's area,
    aspect ratio 3/4 to 4/3, resized to the model's input, as torchvision's RandomResizedCrop)
    and, with ``horizontal_flip``, mirrored with probability 1/2. ``views=0``: no augmentation.
    """

    views: int = 0
    crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    horizontal_flip: bool = True

    def __post_init__(self) -> None:
        _set(self, "views", _check_integer("augmentation views", self.views, 0, _INT32_MAX))
        for name in ("crop", "horizontal_flip"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"augmentation {name} must be True or False, got {_shown(getattr(self, name))}")
        scale = self.crop_scale
        if isinstance(scale, (str, bytes)) or not isinstance(scale, (tuple, list)) or len(scale) != 2:
            raise InvalidInputError(f"augmentation crop_scale must be a pair (low, high), got {_shown(scale)}")
        low, high = (_sent("augmentation crop_scale", value) for value in scale)
        if not 0 < low <= high <= 1:
            raise InvalidInputError(
                f"augmentation crop_scale must satisfy 0 < low <= high <= 1 (shares of the image's area), "
                f"got {_shown(tuple(scale))}"
            )
        _set(self, "crop_scale", (float(scale[0]), float(scale[1])))
        if self.views and not (self.crop or self.horizontal_flip):
            raise InvalidInputError(
                "augmentation views need crop or horizontal_flip (or both): without either, every view is the image"
            )

    @property
    def enabled(self) -> bool:
        return self.views > 0


ClassWeights = Literal["none", "auto"] | dict[str, float]
CLASS_WEIGHT_MODES: tuple[str, ...] = ("none", "auto")


def _check_class_weights(value: object) -> ClassWeights:
    """``"none"``, ``"auto"`` or a dict of positive finite weights by class name (as a new dict)."""
    if isinstance(value, str):
        _check_choice("class_weights", value, CLASS_WEIGHT_MODES)
        return value  # type: ignore[return-value]  # one of the modes
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            f"class_weights must be 'none', 'auto' or a dict of weights by class name, got {_shown(value)}"
        )
    if not value:
        raise InvalidInputError("class_weights is an empty dict; name at least one class, or use 'none'")
    weights: dict[str, float] = {}
    for name, weight in value.items():
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"class_weights keys are class names (non-empty str), got {_shown(name)}")
        sent = _sent(f"class weight of {_shown(name)}", weight)
        if not sent > 0:
            raise InvalidInputError(f"class weight of {_shown(name)} must be a positive number, got {weight!r}")
        weights[name] = float(weight)
    return weights


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
    epochs. ``seed`` fixes the split, the head's initial weights and the augmented views.
    ``augmentation``: random views of the training images (:class:`AugmentationConfig`).
    ``class_weights`` (cross_entropy): ``"none"``, ``"auto"`` (each class weighs
    n / (classes x its examples), scikit-learn's "balanced") or a dict of weights by class
    name (classes not named weigh 1), as ``torch.nn.CrossEntropyLoss(weight=...)`` applies them.

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
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    class_weights: ClassWeights = "none"

    def __post_init__(self) -> None:
        for name in ("base_model", "output_model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidInputError(f"{name} must be a model name (a non-empty str), got {_shown(value)}")
        for name, kind in (("head", HeadConfig), ("optimizer", OptimizerConfig), ("augmentation", AugmentationConfig)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                example = f"{kind.__name__}({value!r})" if isinstance(value, str) else f"{kind.__name__}(...)"
                raise InvalidInputError(f"{name} must be a {kind.__name__}, got {value!r}; e.g. {name}={example}")
        _check_choice("loss", self.loss, LOSSES)
        _set(self, "epochs", _check_count("epochs", self.epochs))
        _set(self, "batch_size", _check_count("batch_size", self.batch_size))
        _set(self, "validation_fraction", _check_fraction("validation_fraction", self.validation_fraction))
        _set(self, "seed", _check_integer("seed", self.seed, 0, UINT64_MAX))
        patience = _check_integer("early_stopping_patience", self.early_stopping_patience, 0, _INT32_MAX)
        _set(self, "early_stopping_patience", patience)
        for name in ("refit", "replace"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _set(self, "class_weights", _check_class_weights(self.class_weights))
        if self.class_weights != "none" and self.loss != "cross_entropy":
            raise InvalidInputError(f"class_weights apply to cross_entropy only; with {self.loss} leave them 'none'")


def _set(config: object, name: str, value: object) -> None:
    """Store a checked value as the plain Python number it is (a numpy integer becomes an int)."""
    object.__setattr__(config, name, value)


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a value may come from the wire and be of any length."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{name} {_shown(value)} is unknown; choose one of {', '.join(choices)}")


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


# -- the one conversion to and from the wire ----------------------------------------------------


def to_message(config: FineTuneConfig) -> pb.FineTuneConfig:
    """The config as the wire carries it, field for field."""
    head, optimizer = config.head, config.optimizer
    return pb.FineTuneConfig(
        base_model=config.base_model,
        output_model=config.output_model,
        head=pb.HeadSpec(kind=head.kind, hidden=head.hidden, blocks=head.blocks, dropout=head.dropout),
        optimizer=pb.OptimizerSpec(
            kind=optimizer.kind,
            lr=optimizer.lr,
            momentum=optimizer.momentum,
            weight_decay=optimizer.weight_decay,
            beta1=optimizer.beta1,
            beta2=optimizer.beta2,
        ),
        loss=config.loss,
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        early_stopping_patience=config.early_stopping_patience,
        refit=config.refit,
        replace=config.replace,
        augmentation=_augmentation_message(config.augmentation),
        class_weights=_class_weights_message(config.class_weights),
    )


def _augmentation_message(augmentation: AugmentationConfig) -> pb.AugmentationSpec:
    low, high = augmentation.crop_scale
    return pb.AugmentationSpec(
        views=augmentation.views,
        crop=augmentation.crop,
        crop_scale_min=low,
        crop_scale_max=high,
        horizontal_flip=augmentation.horizontal_flip,
    )


def _class_weights_message(weights: ClassWeights) -> pb.ClassWeightsSpec:
    if isinstance(weights, dict):
        return pb.ClassWeightsSpec(mode="explicit", weights=weights)
    return pb.ClassWeightsSpec(mode=weights)


def _augmentation_from(message: pb.AugmentationSpec) -> AugmentationConfig:
    default = AugmentationConfig()
    return AugmentationConfig(
        views=message.views,
        crop=message.crop if message.HasField("crop") else default.crop,
        crop_scale=(message.crop_scale_min or default.crop_scale[0], message.crop_scale_max or default.crop_scale[1]),
        horizontal_flip=message.horizontal_flip if message.HasField("horizontal_flip") else default.horizontal_flip,
    )


def _class_weights_from(message: pb.ClassWeightsSpec) -> ClassWeights:
    mode = message.mode or ("explicit" if message.weights else "none")
    if mode == "explicit":
        if not message.weights:
            raise InvalidInputError("class_weights mode 'explicit' needs weights by class name")
        return dict(message.weights)
    if message.weights:
        raise InvalidInputError(f"class_weights mode {_shown(mode)} takes no weights; use mode 'explicit'")
    return _check_class_weights(mode)


def from_message(message: pb.FineTuneConfig) -> FineTuneConfig:
    """The config a message carries, checked as a config made in Python is.

    Proto3 cannot tell a zero from an absent field: a zero kind, size, learning rate, beta,
    loss, epoch count or batch size is the default. ``momentum`` and ``refit`` have presence
    (zero and false are values of theirs). :class:`InvalidInputError` for a value out of range.
    """
    head_default, optimizer_default, default = HeadConfig(), OptimizerConfig(), _DEFAULT
    head, optimizer = message.head, message.optimizer
    return FineTuneConfig(
        base_model=message.base_model,
        output_model=message.output_model,
        head=HeadConfig(
            kind=head.kind or head_default.kind,  # type: ignore[arg-type]  # checked by HeadConfig
            hidden=head.hidden or head_default.hidden,
            blocks=head.blocks or head_default.blocks,
            dropout=head.dropout,
        ),
        optimizer=OptimizerConfig(
            kind=optimizer.kind or optimizer_default.kind,  # type: ignore[arg-type]
            lr=optimizer.lr or optimizer_default.lr,
            momentum=optimizer.momentum if optimizer.HasField("momentum") else optimizer_default.momentum,
            weight_decay=optimizer.weight_decay,
            beta1=optimizer.beta1 or optimizer_default.beta1,
            beta2=optimizer.beta2 or optimizer_default.beta2,
        ),
        loss=message.loss or default.loss,  # type: ignore[arg-type]
        epochs=message.epochs or default.epochs,
        batch_size=message.batch_size or default.batch_size,
        validation_fraction=message.validation_fraction,
        seed=message.seed,
        early_stopping_patience=message.early_stopping_patience,
        refit=message.refit if message.HasField("refit") else default.refit,
        replace=message.replace,
        augmentation=_augmentation_from(message.augmentation),
        class_weights=_class_weights_from(message.class_weights),
    )


# -- the one conversion to and from JSON --------------------------------------------------------


def to_dict(config: FineTuneConfig) -> dict[str, Any]:
    """The config as JSON-ready values: the dataclass's fields, nested as the config is."""
    return asdict(config)


def from_dict(data: object) -> FineTuneConfig:
    """The config of :func:`to_dict`'s output; :class:`InvalidInputError` for anything else."""
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a config is a JSON object, got {type(data).__name__}")
        fields = dict(data)
        head, optimizer = fields.pop("head"), fields.pop("optimizer")
        augmentation = fields.pop("augmentation", {})  # records of older servers have none
        if not isinstance(head, dict) or not isinstance(optimizer, dict) or not isinstance(augmentation, dict):
            raise TypeError("head, optimizer and augmentation are JSON objects")
        if isinstance(augmentation.get("crop_scale"), list):  # JSON has no tuples
            augmentation = {**augmentation, "crop_scale": tuple(augmentation["crop_scale"])}
        return FineTuneConfig(
            head=HeadConfig(**head),
            optimizer=OptimizerConfig(**optimizer),
            augmentation=AugmentationConfig(**augmentation),
            **fields,
        )
    except (KeyError, TypeError) as error:
        raise InvalidInputError(f"not a fine-tuning config: {_shown(str(error))}") from None


_DEFAULT = FineTuneConfig("_", "_")
