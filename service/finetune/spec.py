"""A fine-tuning job's config against this server's own limits, checked once, before any example.

The config itself is the protocol's :class:`~vision_client.protocol.FineTuneConfig`: it checks
kinds, types and ranges when it is made (from Python or from the wire, by the same code). What a
config cannot know is checked here: how large this server lets a head, an epoch count or a batch
be, the model name pattern, how many layers a head has (:data:`MAX_HEAD_LAYERS`) and how wide
they are, and that the head fits the base model's features within
``FineTuneLimits.max_head_parameters``. All of it before any example is read, and without
building the head: the parameters are counted from the layer list.
"""

from __future__ import annotations

from service.config import FineTuneLimits
from service.errors import InvalidInputError, quote
from service.finetune.names import validate_model_name
from vision_client import errors as client_errors
from vision_client.protocol import FineTuneConfig, HeadConfig, Layer, from_message
from vision_client.protocol.fine_tuning import count_layers
from vision_client.protocol.labels import label_problem
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb

MAX_LEARNING_RATE = 10.0
MAX_WEIGHT_DECAY = 1.0
MAX_HEAD_LAYERS = 64  # layers of a head, those inside parallel blocks counted
MAX_AUGMENT_VIEWS = 16  # random views per example whose features a job computes and keeps


def config_from_wire(message: pb.FineTuneConfig) -> FineTuneConfig:
    """The config a request carries, or :class:`InvalidInputError` saying which value is wrong."""
    try:
        return from_message(message)
    except client_errors.InvalidInputError as error:
        raise InvalidInputError(error.message) from None


def head_parameters(head: HeadConfig, in_features: int, out_features: int) -> int:
    """Values ``head`` stores (weights, biases, normalisations' scales and shifts, batch_norm's
    running statistics: its state dict), without building it; :class:`InvalidInputError` where a
    parallel block's branches end in different widths."""
    layers = head.layers if head.kind == "custom" else head.layer_list()  # a dropout first adds nothing
    parameters, width = _walk(layers, in_features, "head layers")  # and errors name the layers as given
    return parameters + (width + 1) * out_features  # the output Linear


def _walk(layers: tuple[Layer, ...], width: int, where: str) -> tuple[int, int]:
    """(values stored, output width) of ``layers`` on inputs ``width`` wide (as heads.build_layers builds them)."""
    total = 0
    for position, layer in enumerate(layers):
        if layer.kind == "linear":
            total += (width + 1) * layer.width
            width = layer.width
        elif layer.kind == "batch_norm":
            total += 4 * width + 1  # weight, bias, running mean and variance, the batch count
        elif layer.kind == "layer_norm":
            total += 2 * width
        elif layer.kind == "parallel":
            walked = [
                _walk(branch, width, f"{where}[{position}].branches[{n}]") for n, branch in enumerate(layer.branches)
            ]
            widths = [out for _, out in walked]
            if len(set(widths)) != 1:
                raise InvalidInputError(
                    f"{where}[{position}] (parallel): its branches end in widths {', '.join(map(str, widths))}; "
                    f"a {layer.combine} needs one width, so end each branch in a linear of the same width"
                )
            total += sum(parameters for parameters, _ in walked)
            width = widths[0]
    return total, width


def check_head(head: HeadConfig, in_features: int, out_features: int, limits: FineTuneLimits) -> HeadConfig:
    """A head's sizes within this server's limits, and its parameters within the budget."""
    _check_sizes(head, limits)
    parameters = head_parameters(head, in_features, out_features)
    if parameters > limits.max_head_parameters:
        if head.kind == "custom":
            shape, fix = f"a head of {count_layers(head.layers)} layers", "choose narrower or fewer linear layers"
        else:
            shape = f"a {head.kind} head with hidden={head.hidden}, blocks={head.blocks}"
            fix = "choose a smaller hidden size or fewer blocks"
        raise InvalidInputError(
            f"{shape} on {in_features} features and {out_features} outputs has {parameters:,} parameters, over the "
            f"limit of {limits.max_head_parameters:,} (--max-head-parameters); {fix}"
        )
    return head


def check_limits(
    config: FineTuneConfig, limits: FineTuneLimits, *, feature_dim: int | None = None, outputs: int = 2
) -> FineTuneConfig:
    """Check everything of this server's that can be checked before any example arrives.

    ``feature_dim`` (the base model's) enables the head-size check; ``outputs`` is the number of
    classes or targets, once known (2, the least, before).
    """
    validate_model_name(config.output_model)
    if feature_dim is not None:
        check_head(config.head, feature_dim, outputs, limits)
    else:
        _check_sizes(config.head, limits)
    if config.optimizer.lr > MAX_LEARNING_RATE:
        raise InvalidInputError(
            f"learning rate must be at most {MAX_LEARNING_RATE:g}, got {quote(config.optimizer.lr)}"
        )
    if config.optimizer.weight_decay > MAX_WEIGHT_DECAY:
        raise InvalidInputError(
            f"weight decay must be at most {MAX_WEIGHT_DECAY:g}, got {quote(config.optimizer.weight_decay)}"
        )
    _at_most("epochs", config.epochs, limits.max_epochs)
    _at_most("batch_size", config.batch_size, limits.max_batch_size)
    _at_most("early_stopping_patience", config.early_stopping_patience, limits.max_epochs)
    _at_most("augmentation views", config.augmentation.views, MAX_AUGMENT_VIEWS)
    if config.train_backbone_blocks:  # within the base model's blocks (.backbone: torch, which front ends lack)
        from service.finetune.backbone import check_backbone

        check_backbone(config)
    if not isinstance(config.class_weights, str):  # weights by name
        weights = dict(config.class_weights)
        if len(weights) > limits.max_labels:
            raise InvalidInputError(
                f"class_weights name {len(weights)} classes; a job takes at most {limits.max_labels} (--max-labels)"
            )
        for name in weights:
            problem = label_problem(name, limits.max_label_length)
            if problem is not None:
                raise InvalidInputError(f"class_weights names the class {quote(name)}, which {problem}")
    return config


def max_examples(config: FineTuneConfig, limits: FineTuneLimits) -> int:
    """Examples a job of ``config`` may bring: augmentation keeps ``1 + views`` feature rows per
    example, and a job holds no more rows than an un-augmented job of ``--max-job-examples``; a job
    that trains backbone blocks keeps activations, within their own bound (:mod:`.backbone`)."""
    rows = limits.max_examples // (1 + config.augmentation.views)
    at_cut = _examples_at_cut(config)
    return rows if at_cut is None else min(rows, at_cut)


def examples_limit_message(config: FineTuneConfig, limits: FineTuneLimits) -> str:
    views = config.augmentation.views
    at_cut = _examples_at_cut(config)
    if at_cut is not None and at_cut < limits.max_examples // (1 + views):
        from service.finetune.backbone import activations_limit_message

        return activations_limit_message(config)
    if not views:
        return f"a job takes at most {limits.max_examples} examples (--max-job-examples)"
    return (
        f"with {views} augmented views per example a job takes at most {max_examples(config, limits)} examples "
        f"(--max-job-examples / (1 + views), as each view's features are kept); send fewer examples or ask "
        "for fewer views"
    )


def check_classes(config: FineTuneConfig, classes: list[str]) -> None:
    """The job's classes, once its examples are in (before any image is decoded), against its config:
    every class named in ``class_weights`` must be one of them."""
    if isinstance(config.class_weights, str):
        return
    known = set(classes)
    unknown = sorted(name for name in dict(config.class_weights) if name not in known)
    if unknown:
        shown = ", ".join(quote(name) for name in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise InvalidInputError(
            f"class_weights name {shown}, which no example has; the job's classes are "
            f"{', '.join(quote(name) for name in classes[:10])}{' ...' if len(classes) > 10 else ''}"
        )


def _check_sizes(head: HeadConfig, limits: FineTuneLimits) -> None:
    """The sizes a config alone shows: the preset's, the number of layers (first: a list of
    thousands costs nothing more to refuse), and every linear width."""
    _at_most("head hidden size", head.hidden, limits.max_hidden)
    _at_most("head blocks", head.blocks, limits.max_blocks)
    layers = count_layers(head.layers)
    if layers > MAX_HEAD_LAYERS:
        raise InvalidInputError(
            f"a head has at most {MAX_HEAD_LAYERS} layers on this server (those inside parallel blocks counted), "
            f"got {layers:,}"
        )
    _check_widths(head.layers, limits, "head layers")


def _check_widths(layers: tuple[Layer, ...], limits: FineTuneLimits, where: str) -> None:
    for position, layer in enumerate(layers):
        if layer.kind == "linear" and layer.width > limits.max_hidden:
            raise InvalidInputError(
                f"{where}[{position}] (linear): width must be at most {limits.max_hidden} on this server, "
                f"got {layer.width}"
            )
        for number, branch in enumerate(layer.branches):
            _check_widths(branch, limits, f"{where}[{position}].branches[{number}]")


def _examples_at_cut(config: FineTuneConfig) -> int | None:
    """The bound on examples that a job's kept activations set (None for a frozen backbone). :mod:`.backbone`
    is imported only for such a job: it needs torch, and the front ends (no torch) import this module
    for its limits (the console's page)."""
    if not config.train_backbone_blocks:
        return None
    from service.finetune.backbone import max_examples_at_cut

    return max_examples_at_cut(config)


def _at_most(name: str, value: int, high: int) -> None:
    if value > high:
        raise InvalidInputError(f"{name} must be at most {high} on this server, got {value}")
