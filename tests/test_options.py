"""The one option table: the parser, the variables, the config and the docs all come from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.config import ServeConfig
from service.options import OPTIONS, _settable_fields, build_serve_parser, config_from_args, markdown
from tests.conftest import ROOT, session_runtime_cache
from tests.tiny import TINY

# Fields no flag sets, each with the reason.
NOT_OPTIONS = {
    "first_message_timeout_s",  # a protocol bound, documented in docs/security.md
    "fine_tuning.max_epochs",  # limits of one job's config, checked against the request; not per deployment
    "fine_tuning.max_hidden",
    "fine_tuning.max_blocks",
    "fine_tuning.max_batch_size",
    "fine_tuning.max_target_size",
}


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    return config_from_args(build_serve_parser(environ or {}).parse_args(argv))


def test_docs_configuration_table_is_the_generated_one() -> None:
    written = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    stale = "docs/configuration.md is stale: run `python -m service.options > docs/configuration.md`"
    assert written == markdown(), stale


def test_each_flag_variable_and_field_is_named_once() -> None:
    for attribute in ("flag", "env", "field"):
        values = [getattr(option, attribute) for option in OPTIONS]
        assert len(values) == len(set(values)), attribute


def test_every_config_field_is_an_option_or_a_stated_exception() -> None:
    fields = set(_settable_fields())
    assert {option.field for option in OPTIONS} | NOT_OPTIONS == fields
    assert not {option.field for option in OPTIONS} & NOT_OPTIONS


def test_defaults_are_the_configs_own() -> None:
    """Only the directories depend on the environment; everything else is ServeConfig's default."""
    parsed = parse([], {"XDG_DATA_HOME": "/data", "XDG_CACHE_HOME": "/cache"})
    expected = dataclasses.replace(
        ServeConfig(),
        model_store=Path("/data/vision-serving/models"),
        runtime=dataclasses.replace(ServeConfig().runtime, cache_dir=Path("/cache/vision-serving/runtimes")),
    )
    assert parsed == expected


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.flag)
def test_every_variable_reaches_its_field(option) -> None:
    """Each option's variable sets the field the table names (a value unlike the default)."""
    samples = {int: "7", float: "7.5", bool: "yes"}
    default = option.default({})
    if option.choices is not None:
        text = next(choice for choice in option.choices if choice != default)
    elif option.flag == "--models":
        text = "alexnet"
    elif option.flag == "--dtype":
        text = "float32,resnet101=bfloat16"
    elif option.flag in ("--metrics-host", "--host", "--weights", "--device"):
        text = "elsewhere"
    elif option.flag == "--allowed-hosts":
        text = "vision.example.com,localhost.example"
    elif option.flag == "--dataset-roots":
        text = "/data/sets,s3://bucket/sets"
    elif default is None and option.type is not Path:
        text = "9"  # a port or a count
    elif option.flag == "--min-precision-agreement":
        text = "0.5"
    else:
        text = "/x/y" if default is None or isinstance(default, Path) else samples[type(default)]
    if option.flag == "--max-queue-size":
        text = "700"  # at least the default batch size
    value = parse([], {option.env: text})
    for part in option.field.split("."):
        value = getattr(value, part)
    assert value != default
    assert parse([option.flag, text] if not option.boolean else [option.flag]) == parse([], {option.env: text})


@pytest.mark.parametrize("spelling", ["none", "off", "NONE", ""])
def test_model_store_none_turns_fine_tuning_off(spelling: str) -> None:
    assert parse(["--model-store", spelling]).model_store is None
    assert parse([], {"VISION_SERVE_MODEL_STORE": spelling}).model_store is None
    assert parse(["--model-store", "./none-of-these"]).model_store == Path("none-of-these")


@pytest.mark.e2e  # a server on the tiny model
def test_fine_tuning_off_says_how_to_turn_it_on() -> None:
    """The message a server without a store gives is reachable from the command line."""
    import vision_client
    from tests.inprocess import InProcessServer

    config = dataclasses.replace(
        parse(["--models", TINY, "--weights", "random", "--model-store", "none", "--runtime", "torch"]),
        runtime=dataclasses.replace(ServeConfig().runtime, name="torch", cache_dir=session_runtime_cache()),
    )
    with InProcessServer(config) as server, vision_client.Client(server.target) as client:
        with pytest.raises(vision_client.FailedPreconditionError, match="--model-store none; start it with"):
            client.delete_model("pets")
        with pytest.raises(vision_client.FailedPreconditionError, match="fine-tuning is off"):
            client.create_job(vision_client.FineTuneConfig(TINY, "pets"), [])
