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

The kinds (``HEAD_KINDS``, ``OPTIMIZER_KINDS``, ``LOSSES``) and the vocabulary of a head's
layers (``LAYER_KINDS``, :class:`Layer`) are defined here once; :func:`vocabulary` hands them,
with every default, to those who cannot import Python (the web console).
"""

from __future__ import annotations

import json
import math
import numbers
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NoReturn, get_args

from google.protobuf import json_format

from vision_client.errors import InvalidInputError
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb

HeadKind = Literal["linear", "two_layer", "parallel", "custom"]
LayerKind = Literal["linear", "relu", "gelu", "dropout", "batch_norm", "layer_norm", "parallel"]
Combine = Literal["product", "sum"]
OptimizerKind = Literal["adam", "sgd"]
Loss = Literal["cross_entropy", "mse"]

HEAD_KINDS: tuple[str, ...] = get_args(HeadKind)
HEAD_PRESETS: tuple[str, ...] = HEAD_KINDS[:-1]  # "custom" is the layer list itself
LAYER_KINDS: tuple[str, ...] = get_args(LayerKind)
COMBINES: tuple[str, ...] = get_args(Combine)
OPTIMIZER_KINDS: tuple[str, ...] = get_args(OptimizerKind)
LOSSES: tuple[str, ...] = get_args(Loss)

_INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1  # the wire's seed
_SHOWN_CHARS = 80  # of a bad value in an error message
_FLOAT32 = struct.Struct("<f")


HEAD_HELP: dict[str, str] = {
    "linear": "one Linear from the features to the outputs",
    "two_layer": "Linear-ReLU-Linear, `hidden` wide",
    "parallel": "`blocks` gated blocks (the product of two Linears, clamped at zero), then a Linear",
    "custom": "the `layers` given, then a Linear to the outputs",
}
LAYER_HELP: dict[str, str] = {
    "linear": "a fully connected layer of `width` outputs (weights and biases)",
    "relu": "max(x, 0)",
    "gelu": "the Gaussian error linear unit",
    "dropout": "zeroes each value with probability `p` (in [0, 1)) while training",
    "batch_norm": "normalises each feature over the batch (running statistics when serving)",
    "layer_norm": "normalises each example over its features",
    "parallel": "two or more `branches` (layer lists) on the same input, their outputs combined by "
    "`combine`: product (elementwise, the default) or sum",
}
MAX_NESTING = 8  # parallel blocks inside parallel blocks: a bound of the protocol's, whatever the server
MAX_LAYERS = 256  # layers of a head, those in parallel blocks counted: the protocol's bound (a server's is lower)
_LAYER_FIELDS = ("kind", "width", "p", "branches", "combine")


@dataclass(frozen=True)
class Layer:
    """One layer of a head, from the fixed vocabulary :data:`LAYER_KINDS` (:data:`LAYER_HELP`).

    ``width`` is a ``linear`` layer's output size; ``p`` a ``dropout`` layer's probability;
    ``branches`` a ``parallel`` block's layer lists (two or more, run on the same input) and
    ``combine`` how their outputs meet. A field a kind does not take must be left out.

    >>> Layer("parallel", branches=[[Layer("linear", width=64)], [Layer("linear", width=64)]])  # doctest: +SKIP
    """

    kind: LayerKind
    width: int = 0
    p: float = 0.0
    branches: tuple[tuple[Layer, ...], ...] = ()
    combine: Combine = "product"

    def __post_init__(self) -> None:
        kind = self.kind
        _check_choice("layer kind", kind, LAYER_KINDS)
        if kind == "linear":
            _set(self, "width", _check_count("linear width", self.width))
        elif self.width != 0:
            raise InvalidInputError(f"a {kind} layer takes no width (only linear does), got {_shown(self.width)}")
        if kind == "dropout":
            _set(self, "p", _check_fraction("dropout p", self.p))
        elif self.p != 0:
            raise InvalidInputError(f"a {kind} layer takes no p (only dropout does), got {_shown(self.p)}")
        if kind == "parallel":
            _set(self, "branches", _check_branches(self.branches))
            _check_choice("parallel combine", self.combine, COMBINES)
            if _nesting(self) > MAX_NESTING:
                raise InvalidInputError(f"parallel blocks nest at most {MAX_NESTING} deep")
        elif self.branches or self.combine != "product":
            raise InvalidInputError(f"a {kind} layer takes no branches or combine (only parallel does)")
        else:
            _set(self, "branches", ())  # an empty list from the wire or JSON, as the tuple it stands for


def _check_branches(branches: object) -> tuple[tuple[Layer, ...], ...]:
    if not isinstance(branches, (list, tuple)) or len(branches) < 2:
        count = len(branches) if isinstance(branches, (list, tuple)) else _shown(branches)
        raise InvalidInputError(f"a parallel layer needs two or more branches (lists of layers), got {count}")
    checked = []
    for number, branch in enumerate(branches):
        layers = _check_layers(f"parallel branch {number}", branch)
        if not layers:
            raise InvalidInputError(f"parallel branch {number} is empty; give it at least one layer")
        checked.append(layers)
    return tuple(checked)


def _check_layers(name: str, layers: object) -> tuple[Layer, ...]:
    if not isinstance(layers, (list, tuple)):
        raise InvalidInputError(f"{name} must be a list of Layer, got {_shown(layers)}")
    for position, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise InvalidInputError(
                f"{name}[{position}] must be a Layer, e.g. Layer('linear', width=256), got {_shown(layer)}"
            )
    return tuple(layers)


def _nesting(layer: Layer) -> int:
    """How deep parallel blocks nest in ``layer`` (1: a parallel block of plain layers).
    Its branches were checked when made, so each is at most :data:`MAX_NESTING` deep."""
    inner = [_nesting(inside) for branch in layer.branches for inside in branch if inside.kind == "parallel"]
    return 1 + max(inner, default=0)


def count_layers(layers: tuple[Layer, ...]) -> int:
    """Layers in ``layers``, those inside parallel blocks included (each block counts too)."""
    return sum(1 + sum(count_layers(branch) for branch in layer.branches) for layer in layers)


@dataclass(frozen=True)
class HeadConfig:
    """The new head, from its input features to a Linear that gives the outputs.

    A preset ``kind``: ``linear`` (that Linear alone); ``two_layer`` (Linear-ReLU-Linear,
    ``hidden`` wide); ``parallel`` (``blocks`` blocks whose output is the product of two
    Linears clamped at zero, then a Linear). Or ``layers``, a list of :class:`Layer` (kind
    ``custom``, set by giving layers): the head is those layers, then the output Linear.
    ``dropout`` applies to the head's input while training. :meth:`layer_list` says what
    any head is made of.

    >>> HeadConfig(layers=[Layer("linear", width=512), Layer("batch_norm"), Layer("gelu")])  # doctest: +SKIP
    """

    kind: HeadKind = "linear"
    hidden: int = 256
    blocks: int = 2
    dropout: float = 0.0
    layers: tuple[Layer, ...] = ()

    def __post_init__(self) -> None:
        layers = _check_layers("head layers", self.layers)
        _set(self, "layers", layers)
        if layers and self.kind == "linear":  # the default kind: layers given make a custom head
            _set(self, "kind", "custom")
        _check_choice("head kind", self.kind, HEAD_KINDS)
        if layers and self.kind != "custom":
            raise InvalidInputError(
                f"a {self.kind} head is a preset and takes no layers; give the layers alone (kind custom)"
            )
        if count_layers(layers) > MAX_LAYERS:
            raise InvalidInputError(_too_many_layers("head layers"))
        if self.kind == "custom" and not layers:
            raise InvalidInputError(
                "a custom head needs its layers, e.g. layers=[Layer('linear', width=256), Layer('relu')]"
            )
        _set(self, "hidden", _check_count("head hidden", self.hidden))
        _set(self, "blocks", _check_count("head blocks", self.blocks))
        _set(self, "dropout", _check_fraction("head dropout", self.dropout))

    def layer_list(self) -> tuple[Layer, ...]:
        """Every layer of the head before its output Linear: the input's dropout, then the
        preset's layers or the custom ones. The server builds the head from this alone."""
        front = (Layer("dropout", p=self.dropout),) if self.dropout > 0 else ()
        if self.kind == "custom":
            return front + self.layers
        if self.kind == "two_layer":
            return (*front, Layer("linear", width=self.hidden), Layer("relu"))
        if self.kind == "parallel":
            gate = (Layer("linear", width=self.hidden),)
            return front + (Layer("parallel", branches=(gate, gate)), Layer("relu")) * self.blocks
        return front  # linear


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


# "none", "auto", or weights by class name: given as a dict, kept as (name, weight) pairs sorted
# by name, so that a config stays hashable and equal configs compare equal.
ClassWeights = Literal["none", "auto"] | tuple[tuple[str, float], ...]
CLASS_WEIGHT_MODES: tuple[str, ...] = ("none", "auto")


def _check_class_weights(value: object) -> ClassWeights:
    """``"none"``, ``"auto"``, or positive finite weights by class name (a dict, or (name, weight)
    pairs) as sorted pairs."""
    if isinstance(value, str):
        _check_choice("class_weights", value, CLASS_WEIGHT_MODES)
        return value  # type: ignore[return-value]  # one of the modes
    if isinstance(value, (tuple, list)) and all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in value):
        value = dict(value)  # the pairs the config keeps (and JSON's lists of them)
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
    return tuple(sorted(weights.items()))


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
    ``train_backbone_blocks``: train the last k blocks of the base model's backbone with the head
    (0: the backbone stays frozen; each model has its own number of blocks), at ``backbone_lr_factor``
    times the optimizer's learning rate; the served model is then the whole new network.
    ``dataset`` (cross_entropy): the images named instead of uploaded, ``s3://bucket/prefix/`` or a
    directory on the server under one of its ``--dataset-roots``, in torchvision's ImageFolder layout
    (:func:`image_folder_class`); a job with a dataset sends no examples.

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
    class_weights: ClassWeights | Mapping[str, float] = "none"  # kept as ClassWeights
    train_backbone_blocks: int = 0
    backbone_lr_factor: float = 0.01
    dataset: str = ""

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
        blocks = _check_integer(
            "train_backbone_blocks",
            self.train_backbone_blocks,
            0,
            _INT32_MAX,
            f"an integer from 0 (a frozen backbone) to the base model's number of blocks (at most {_INT32_MAX})",
        )
        _set(self, "train_backbone_blocks", blocks)
        if not _sent("backbone_lr_factor", self.backbone_lr_factor) > 0:
            raise InvalidInputError(
                f"backbone_lr_factor must be a positive number (the trained blocks' lr is the optimizer's lr "
                f"times it), got {self.backbone_lr_factor!r}"
            )
        _set(self, "backbone_lr_factor", float(self.backbone_lr_factor))
        _check_dataset(self.dataset, self.loss)


MAX_DATASET_CHARS = 1024  # of a dataset's name (a URL or a path)
IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")  # what the server decodes


def _check_dataset(dataset: object, loss: str) -> None:
    if not isinstance(dataset, str):
        raise InvalidInputError(f"dataset must be a str (s3://bucket/prefix/ or a directory), got {_shown(dataset)}")
    if not dataset:
        return
    if len(dataset) > MAX_DATASET_CHARS or not dataset.isprintable():
        raise InvalidInputError(
            f"dataset must be one line of at most {MAX_DATASET_CHARS} characters, got {_shown(dataset)}"
        )
    if not (dataset.startswith("/") or "://" in dataset):
        raise InvalidInputError(
            f"dataset {_shown(dataset)} is neither s3://bucket/prefix/ nor an absolute directory path on the server"
        )
    if loss != "cross_entropy":
        raise InvalidInputError(
            f"a dataset's classes are its folders (ImageFolder's layout): it takes loss cross_entropy, not {loss}"
        )


def image_folder_class(key: str) -> str | None:
    """The class of the file at ``key`` ('/'-separated, relative to a data set's root) in torchvision's
    ImageFolder layout, the name of the first folder, or None where the layout leaves the file out: a
    file at the top level, anything hidden (a part that starts with '.'), or a name without one of
    :data:`IMAGE_SUFFIXES` (in any case). The images of a class may lie at any depth below its folder."""
    parts = key.split("/")
    if len(parts) < 2 or any(not part or part.startswith(".") for part in parts):
        return None
    return parts[0] if parts[-1].lower().endswith(IMAGE_SUFFIXES) else None


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
        head=pb.HeadSpec(
            kind=head.kind,
            hidden=head.hidden,
            blocks=head.blocks,
            dropout=head.dropout,
            layers=[_layer_message(layer) for layer in head.layers],
        ),
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
        train_backbone_blocks=config.train_backbone_blocks,
        backbone_lr_factor=config.backbone_lr_factor,
        dataset=config.dataset,
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


def _class_weights_message(weights: ClassWeights | Mapping[str, float]) -> pb.ClassWeightsSpec:
    if isinstance(weights, str):
        return pb.ClassWeightsSpec(mode=weights)
    return pb.ClassWeightsSpec(mode="explicit", weights=dict(weights))


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
        return _check_class_weights(dict(message.weights))
    if message.weights:
        raise InvalidInputError(f"class_weights mode {_shown(mode)} takes no weights; use mode 'explicit'")
    return _check_class_weights(mode)


def from_message(message: pb.FineTuneConfig) -> FineTuneConfig:
    """The config a message carries, checked as a config made in Python is.

    Proto3 cannot tell a zero from an absent field: a zero kind, size, learning rate, beta,
    loss, epoch count, batch size or backbone lr factor is the default. ``momentum`` and ``refit`` have presence
    (zero and false are values of theirs). :class:`InvalidInputError` for a value out of range.
    """
    head_default, optimizer_default, default = HeadConfig(), OptimizerConfig(), _DEFAULT
    head, optimizer = message.head, message.optimizer
    return FineTuneConfig(
        base_model=message.base_model,
        output_model=message.output_model,
        head=HeadConfig(
            kind=head.kind or ("custom" if head.layers else head_default.kind),  # type: ignore[arg-type]  # checked
            hidden=head.hidden or head_default.hidden,
            blocks=head.blocks or head_default.blocks,
            dropout=head.dropout,
            layers=_layers_from_message(head.layers, "head layers", 0),
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
        train_backbone_blocks=message.train_backbone_blocks,
        backbone_lr_factor=message.backbone_lr_factor or default.backbone_lr_factor,
        dataset=message.dataset,
    )


def _layer_message(layer: Layer) -> pb.HeadLayer:
    return pb.HeadLayer(
        kind=layer.kind,
        width=layer.width,
        p=layer.p,
        branches=[pb.HeadBranch(layers=[_layer_message(inner) for inner in branch]) for branch in layer.branches],
        combine=layer.combine if layer.kind == "parallel" else "",
    )


def _too_many_layers(where: str) -> str:
    return (
        f"{where}: a head has at most {MAX_LAYERS} layers, those inside parallel blocks counted (a server allows fewer)"
    )


class _Budget:
    """Layers a conversion may still make: a hostile list costs at most :data:`MAX_LAYERS` of them."""

    def __init__(self) -> None:
        self.left = MAX_LAYERS

    def take(self, where: str) -> None:
        self.left -= 1
        if self.left < 0:
            raise InvalidInputError(_too_many_layers(where))


def _layers_from_message(
    layers: Sequence[pb.HeadLayer], where: str, depth: int, budget: _Budget | None = None
) -> tuple[Layer, ...]:
    """The layers a message carries; an error names the layer (``head layers[3]``). Nesting and
    the number of layers are bounded before they are followed, so a hostile message costs
    little: never more than :data:`MAX_LAYERS` layers made, never deeper than :data:`MAX_NESTING`."""
    if depth > MAX_NESTING:
        raise InvalidInputError(f"{where}: parallel blocks nest at most {MAX_NESTING} deep")
    budget = budget or _Budget()
    converted = []
    for position, message in enumerate(layers):
        at = f"{where}[{position}]"
        budget.take(where)
        branches = [
            _layers_from_message(branch.layers, f"{at}.branches[{number}]", depth + 1, budget)
            for number, branch in enumerate(message.branches)
        ]
        converted.append(_layer(at, message.kind, message.width, message.p, branches, message.combine or "product"))
    return tuple(converted)


def _layer(at: str, kind: object, width: object, p: object, branches: object, combine: object) -> Layer:
    try:
        return Layer(kind, width, p, branches, combine)  # type: ignore[arg-type]  # checked by Layer
    except InvalidInputError as error:
        raise InvalidInputError(f"{at}: {error.message}") from None


# -- the one conversion to and from JSON --------------------------------------------------------


def to_dict(config: FineTuneConfig) -> dict[str, Any]:
    """The config as JSON-ready values: the dataclass's fields, nested as the config is (a
    head as :func:`head_to_dict` writes it)."""
    fields = asdict(config)
    fields["head"] = head_to_dict(config.head)
    fields["augmentation"]["crop_scale"] = list(config.augmentation.crop_scale)  # as JSON reads it back
    if not isinstance(config.class_weights, str):
        fields["class_weights"] = dict(config.class_weights)  # by name, as a JSON object
    return fields


def head_to_dict(head: HeadConfig) -> dict[str, Any]:
    """A head as JSON-ready values (what a model manifest stores): its fields, and a custom head's
    layers (:func:`layer_to_dict`). A preset is written as it was before heads had layers, so a
    server of before reads it."""
    data: dict[str, Any] = {"kind": head.kind, "hidden": head.hidden, "blocks": head.blocks, "dropout": head.dropout}
    if head.layers:
        data["layers"] = [layer_to_dict(layer) for layer in head.layers]
    return data


def layer_to_dict(layer: Layer) -> dict[str, Any]:
    """A layer as JSON: its kind and the fields its kind takes (``{"kind": "linear", "width": 64}``)."""
    data: dict[str, Any] = {"kind": layer.kind}
    if layer.kind == "linear":
        data["width"] = layer.width
    elif layer.kind == "dropout":
        data["p"] = layer.p
    elif layer.kind == "parallel":
        data["branches"] = [[layer_to_dict(inner) for inner in branch] for branch in layer.branches]
        data["combine"] = layer.combine
    return data


def head_from_dict(data: object) -> HeadConfig:
    """The head of :func:`head_to_dict`'s output, or of a record written before heads had layers
    (no ``layers``); :class:`InvalidInputError` for anything else."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"a head is a JSON object, got {type(data).__name__}")
    fields = dict(data)
    layers = fields.pop("layers", [])
    unknown = set(fields) - {"kind", "hidden", "blocks", "dropout"}
    if unknown:
        raise InvalidInputError(f"a head has no field {_shown(sorted(unknown)[0])}")
    return HeadConfig(**fields, layers=layers_from_json(layers, "head layers"))


def layers_from_json(
    data: object, where: str = "layers", depth: int = 0, budget: _Budget | None = None
) -> tuple[Layer, ...]:
    """Layers from JSON (:func:`layer_to_dict`'s form); an error names the layer and the field.
    Bounded as :func:`from_message` is."""
    if depth > MAX_NESTING:
        raise InvalidInputError(f"{where}: parallel blocks nest at most {MAX_NESTING} deep")
    if not isinstance(data, list):
        raise InvalidInputError(f"{where} must be a list of layers, got {_shown(data)}")
    budget = budget or _Budget()
    converted = []
    for position, item in enumerate(data):
        at = f"{where}[{position}]"
        budget.take(where)
        if not isinstance(item, dict) or "kind" not in item:
            raise InvalidInputError(f'{at} must be an object with a kind, e.g. {{"kind": "relu"}}, got {_shown(item)}')
        unknown = set(item) - set(_LAYER_FIELDS)
        if unknown:
            raise InvalidInputError(
                f"{at} has an unknown field {_shown(sorted(unknown)[0])}; a layer has {', '.join(_LAYER_FIELDS)}"
            )
        branches = item.get("branches", [])
        if not isinstance(branches, list):
            raise InvalidInputError(f"{at}.branches must be a list of layer lists, got {_shown(branches)}")
        inner = [layers_from_json(b, f"{at}.branches[{n}]", depth + 1, budget) for n, b in enumerate(branches)]
        converted.append(
            _layer(at, item["kind"], item.get("width", 0), item.get("p", 0.0), inner, item.get("combine", "product"))
        )
    return tuple(converted)


# -- layers as one line of text (the command line's --layers) ------------------------------------


def format_layers(layers: tuple[Layer, ...]) -> str:
    """Layers as :func:`parse_layers` reads them: ``linear:512,relu,dropout:0.2,parallel(linear:64|linear:64)``."""
    return ",".join(_format_layer(layer) for layer in layers)


def _format_layer(layer: Layer) -> str:
    if layer.kind == "linear":
        return f"linear:{layer.width}"
    if layer.kind == "dropout":
        return f"dropout:{layer.p!r}"
    if layer.kind == "parallel":
        combine = "" if layer.combine == "product" else f":{layer.combine}"
        return f"parallel{combine}(" + "|".join(format_layers(branch) for branch in layer.branches) + ")"
    return layer.kind


def parse_layers(text: str) -> tuple[Layer, ...]:
    """The layers of one line: ``KIND[:VALUE]`` separated by commas, the value a linear's width
    or a dropout's p; ``parallel[:COMBINE](BRANCH|BRANCH...)`` with each branch such a list.
    A JSON list (:func:`layer_to_dict`'s form) is read too. :class:`InvalidInputError` says
    where the text goes wrong."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise InvalidInputError(f"layers: not valid JSON: {_shown(str(error))}") from None
        return layers_from_json(data)
    parser = _LayerText(text)
    layers = parser.layers(0)
    if parser.position != len(text):
        parser.fail("expected ',' between layers")
    return layers


_WORD = "_.-+"  # characters of a kind or a number, besides letters and digits


class _LayerText:
    """A recursive descent over :func:`parse_layers`'s grammar, nesting bounded as the wire's is."""

    def __init__(self, text: str) -> None:
        self.text, self.position = text, 0

    def fail(self, problem: str) -> NoReturn:
        before, after = self.text[: self.position], self.text[self.position :]
        raise InvalidInputError(
            f"layers: {problem} at character {self.position + 1}: {_shown(before)} <here> {_shown(after)}"
        )

    def layers(self, depth: int) -> tuple[Layer, ...]:
        if depth > MAX_NESTING:
            self.fail(f"parallel blocks nest at most {MAX_NESTING} deep")
        found = [self.layer(depth)]
        while self.peek() == ",":
            self.position += 1
            found.append(self.layer(depth))
        return tuple(found)

    def peek(self) -> str:
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1
        return self.text[self.position : self.position + 1]

    def word(self) -> str:
        self.peek()
        start = self.position
        text = self.text
        while self.position < len(text) and (text[self.position].isalnum() or text[self.position] in _WORD):
            self.position += 1
        return self.text[start : self.position]

    def layer(self, depth: int) -> Layer:
        at = self.position
        kind = self.word()
        if not kind:
            self.fail(f"expected a layer ({', '.join(LAYER_KINDS)})")
        value = ""
        if self.peek() == ":":
            self.position += 1
            value = self.word()
        branches: list[tuple[Layer, ...]] = []
        if kind == "parallel" and self.peek() == "(":
            self.position += 1
            branches.append(self.layers(depth + 1))
            while self.peek() == "|":
                self.position += 1
                branches.append(self.layers(depth + 1))
            if self.peek() != ")":
                self.fail("expected '|' or ')' in a parallel block")
            self.position += 1
        try:
            if kind == "linear":
                return Layer("linear", width=int(value))
            if kind == "dropout":
                return Layer("dropout", p=float(value))
            if kind == "parallel":
                return Layer("parallel", branches=tuple(branches), combine=value or "product")  # type: ignore[arg-type]
            if value:
                raise InvalidInputError(f"a {kind} layer takes no value")
            return Layer(kind)  # type: ignore[arg-type]  # checked by Layer
        except ValueError:
            self.position = at
            self.fail(f"{kind} needs a number after ':', got {_shown(value)}")
        except InvalidInputError as error:
            self.position = at
            self.fail(error.message)


def vocabulary() -> dict[str, Any]:
    """What a form needs to build a config without restating it: every kind, the layers and the
    fields each takes, an example of layers as the wire's JSON (what the REST API takes), and
    every default (a config's JSON, :func:`to_dict`, without the names)."""
    defaults = to_dict(_DEFAULT)
    del defaults["base_model"], defaults["output_model"]
    takes = {"linear": ["width"], "dropout": ["p"], "parallel": ["branches", "combine"]}
    example = parse_layers("linear:256,batch_norm,relu,dropout:0.25,parallel(linear:64|linear:64),relu")
    return {
        "head_kinds": list(HEAD_KINDS),
        "head_help": dict(HEAD_HELP),
        "layers_example": [json_format.MessageToDict(_layer_message(layer)) for layer in example],  # the wire's JSON
        "head_presets": list(HEAD_PRESETS),
        "layers": {kind: {"help": LAYER_HELP[kind], "fields": takes.get(kind, [])} for kind in LAYER_KINDS},
        "combines": list(COMBINES),
        "max_nesting": MAX_NESTING,
        "max_layers": MAX_LAYERS,
        "optimizer_kinds": list(OPTIMIZER_KINDS),
        "losses": list(LOSSES),
        "defaults": defaults,
    }


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
            head=head_from_dict(head),
            optimizer=OptimizerConfig(**optimizer),
            augmentation=AugmentationConfig(**augmentation),
            **fields,
        )
    except (KeyError, TypeError) as error:
        raise InvalidInputError(f"not a fine-tuning config: {_shown(str(error))}") from None


_DEFAULT = FineTuneConfig("_", "_")
