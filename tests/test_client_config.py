"""``vision_client.FineTuneConfig``: its checks, its one conversion to the wire, its CLI options.

No server: the config is data, and what the server makes of the message is shown by
converting it with the server's own ``config_from_wire`` (the protocol's ``from_message``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.finetune import store as server_store
from service.finetune.spec import config_from_wire
from tests.client_util import EVERY_SETTING
from vision_client import FineTuneConfig, HeadConfig, InvalidInputError, OptimizerConfig
from vision_client.cli import FINE_TUNE_OPTIONS, build_parser, config_from_args
from vision_client.cli import Defaults as CliDefaults
from vision_client.protocol import HEAD_KINDS, LOSSES, OPTIMIZER_KINDS
from vision_client.protocol import to_message as config_message
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as ft_pb

EVERY = dataclasses.replace(EVERY_SETTING, output_model="pets")


def leaves(message: Any, descriptor: Descriptor, prefix: str = "") -> dict[str, Any]:
    """Every scalar field of ``message``, nested ones as ``head.hidden``."""
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.name == "ClassWeightsSpec":
            # One setting of the config's: a mode, or weights by name (kept as sorted pairs).
            weights = tuple(sorted(value.weights.items()))
            values[prefix + field.name] = weights if value.mode == "explicit" else (value.mode or "none")
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            values.update(leaves(value, field.message_type, f"{prefix}{field.name}."))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:  # a head's layers (tests/test_head_layers.py converts them)
            values[prefix + field.name] = tuple(value)
        else:
            values[prefix + field.name] = value
    if descriptor.name == "AugmentationSpec":  # the config's crop_scale is the pair (min, max)
        values[prefix + "crop_scale"] = (values.pop(prefix + "crop_scale_min"), values.pop(prefix + "crop_scale_max"))
    return values


def config_leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every field of a config dataclass, nested ones as ``head.hidden``."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            values.update(config_leaves(value, f"{prefix}{field.name}."))
        else:
            values[prefix + field.name] = value
    return values


# -- the dataclass and the wire ---------------------------------------------------------------


def test_the_config_has_every_field_of_the_message_and_nothing_else():
    message_fields = set(leaves(ft_pb.FineTuneConfig(), ft_pb.FineTuneConfig.DESCRIPTOR))
    config_fields = set(config_leaves(EVERY))
    assert config_fields == message_fields


def test_every_field_is_converted_as_it_is():
    message = config_message(EVERY)
    sent = leaves(message, ft_pb.FineTuneConfig.DESCRIPTOR)
    for name, value in config_leaves(EVERY).items():
        if isinstance(value, float) or (isinstance(value, tuple) and value and all(type(v) is float for v in value)):
            assert sent[name] == pytest.approx(value, rel=1e-6), name  # float32 on the wire
        else:
            assert sent[name] == value, name
    assert message.HasField("refit") and message.optimizer.HasField("momentum")  # proto3 optionals, sent


def test_the_server_reads_every_field_back():
    """The server's own reading of the message, then its writing of it: nothing lost, nothing defaulted."""
    message = config_message(EVERY)
    assert config_message(config_from_wire(message)) == message


def test_the_defaults_are_the_servers():
    """A config left at its defaults means to the server what the server's own defaults mean."""
    ours = config_from_wire(config_message(FineTuneConfig("resnet101", "pets")))
    theirs = FineTuneConfig("resnet101", "pets")
    flat_ours, flat_theirs = config_leaves(ours), config_leaves(theirs)
    assert flat_ours.keys() == flat_theirs.keys()
    for name, value in flat_theirs.items():
        if isinstance(value, (float, tuple)):
            assert flat_ours[name] == pytest.approx(value, rel=1e-6), name
        else:
            assert flat_ours[name] == value, name


def test_kinds_have_one_definition_that_the_server_uses():
    assert server_store.HEAD_KINDS is HEAD_KINDS and server_store.LOSSES is LOSSES
    assert OPTIMIZER_KINDS == ("adam", "sgd")
    assert HEAD_KINDS == ("linear", "two_layer", "parallel", "custom") and LOSSES == ("cross_entropy", "mse")


def test_the_config_is_frozen_and_replace_checks_again():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EVERY.epochs = 3  # type: ignore[misc]
    assert dataclasses.replace(EVERY, epochs=20).epochs == 20
    with pytest.raises(InvalidInputError, match="epochs must be a positive integer"):
        dataclasses.replace(EVERY, epochs=0)
    assert hash(EVERY) == hash(dataclasses.replace(EVERY))


def test_numpy_numbers_are_stored_as_python_numbers():
    config = FineTuneConfig(
        "a", "b", head=HeadConfig(hidden=np.int64(32), dropout=np.float32(0.5)), epochs=np.int32(3), seed=np.uint64(9)
    )
    assert type(config.head.hidden) is int and type(config.head.dropout) is float
    assert type(config.epochs) is int and type(config.seed) is int
    assert config_message(config).head.hidden == 32


# -- every check, each with the message that says how to fix it -------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FineTuneConfig("", "pets"), "base_model must be a model name"),
        (lambda: FineTuneConfig("resnet101", None), "output_model must be a model name"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", head="two_layer"), r"head=HeadConfig\('two_layer'\)"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", optimizer="sgd"), r"optimizer=OptimizerConfig\('sgd'\)"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", head={"kind": "linear"}), r"must be a HeadConfig.*HeadConfig\(\.\.\.\)"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", loss="hinge"), "loss 'hinge' is unknown; choose one of cross_entropy, mse"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", epochs=0), "epochs must be a positive integer"),
        (lambda: FineTuneConfig("a", "b", epochs=2.5), "epochs must be a positive integer"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", epochs=True), "epochs must be a positive integer"),
        (lambda: FineTuneConfig("a", "b", epochs=2**31), "epochs must be a positive integer"),
        (lambda: FineTuneConfig("a", "b", batch_size=-1), "batch_size must be a positive integer"),
        (lambda: FineTuneConfig("a", "b", validation_fraction=1.0), r"validation_fraction must be in \[0, 1\)"),
        (lambda: FineTuneConfig("a", "b", validation_fraction=-0.1), r"validation_fraction must be in \[0, 1\)"),
        (lambda: FineTuneConfig("a", "b", validation_fraction=math.nan), "must be a finite number"),
        (lambda: FineTuneConfig("a", "b", validation_fraction="0.2"), "must be a finite number"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", seed=-1), "seed must be an integer from 0"),
        (lambda: FineTuneConfig("a", "b", seed=2**64), "seed must be an integer from 0"),
        (lambda: FineTuneConfig("a", "b", early_stopping_patience=-1), "early_stopping_patience must be"),
        (lambda: FineTuneConfig("a", "b", refit=1), "refit must be True or False"),  # type: ignore[arg-type]
        (lambda: FineTuneConfig("a", "b", replace="yes"), "replace must be True or False"),  # type: ignore[arg-type]
        (lambda: HeadConfig("mlp"), "head kind 'mlp' is unknown; choose one of linear, two_layer, parallel"),  # type: ignore[arg-type]
        (lambda: HeadConfig(hidden=0), "head hidden must be a positive integer"),
        (lambda: HeadConfig(blocks=0), "head blocks must be a positive integer"),
        (lambda: HeadConfig(dropout=1.0), r"head dropout must be in \[0, 1\)"),
        (lambda: OptimizerConfig("rmsprop"), "optimizer kind 'rmsprop' is unknown; choose one of adam, sgd"),  # type: ignore[arg-type]
        (lambda: OptimizerConfig(lr=0), "optimizer lr must be a positive number"),
        (lambda: OptimizerConfig(lr=-1e-3), "optimizer lr must be a positive number"),
        (lambda: OptimizerConfig(lr=1e-50), "optimizer lr must be a positive number"),  # a float32 zero
        (lambda: OptimizerConfig(lr=math.inf), "optimizer lr must be a finite number"),
        (lambda: OptimizerConfig(momentum=1.0), r"optimizer momentum must be in \[0, 1\)"),
        (lambda: OptimizerConfig(weight_decay=-1.0), "optimizer weight_decay must not be negative"),
        (lambda: OptimizerConfig(weight_decay=1e39), "too large to send"),
        (lambda: OptimizerConfig(beta1=0.0), r"beta1 must be in \(0, 1\).*the server reads it as its default"),
        (lambda: OptimizerConfig(beta2=1.0), r"beta2 must be in \(0, 1\)"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(make, message):
    with pytest.raises(InvalidInputError, match=message):
        make()


def test_edges_that_are_allowed():
    config = FineTuneConfig(
        "a", "b", head=HeadConfig(dropout=0.0), optimizer=OptimizerConfig(momentum=0.0), validation_fraction=0.0
    )
    message = config_message(config)
    assert message.validation_fraction == 0.0 and message.optimizer.momentum == 0.0
    assert FineTuneConfig("a", "b", seed=2**64 - 1).seed == 2**64 - 1


# -- the command line ----------------------------------------------------------------------------


def fine_tune_args(*options: str) -> argparse.Namespace:
    parser = build_parser(CliDefaults())
    return parser.parse_args(["fine-tune", "photos", "--base", "resnet101", "--output", "pets", *options])


def test_every_field_has_a_cli_option():
    paths = {option.path for option in FINE_TUNE_OPTIONS} | {"base_model", "output_model"}
    assert paths == set(config_leaves(EVERY))


def test_cli_options_make_the_config():
    args = fine_tune_args(
        "--head", "parallel", "--hidden", "64", "--blocks", "3", "--dropout", "0.25",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.5", "--weight-decay", "1e-4",
        "--beta1", "0.8", "--beta2", "0.99", "--loss", "mse", "--epochs", "7", "--batch-size", "16",
        "--validation-fraction", "0.3", "--seed", str(2**40), "--early-stopping-patience", "3",
        "--no-refit", "--replace", "--augment-views", "2", "--no-crop", "--crop-scale", "0.5", "0.9",
    )  # fmt: skip
    assert config_from_args(args) == EVERY
    assert args.directory == Path("photos")


def test_cli_defaults_are_the_configs():
    assert config_from_args(fine_tune_args()) == FineTuneConfig("resnet101", "pets")
    assert config_from_args(fine_tune_args("--refit")).refit is True


def test_cli_values_are_checked_by_the_config():
    with pytest.raises(InvalidInputError, match="epochs must be a positive integer"):
        config_from_args(fine_tune_args("--epochs", "0"))
    with pytest.raises(InvalidInputError, match="beta1"):
        config_from_args(fine_tune_args("--beta1", "0"))
