"""Command line and configuration: flags, environment variables, weights sources."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from service.cli import build_serve_parser, config_from_args
from service.errors import WeightsUnavailableError
from service.models import WeightsSource, build_model, get_model_spec, list_models
from tests.conftest import ROOT
from tests.tiny import TINY


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return config_from_args(build_serve_parser(environ or {}).parse_args(argv))


def test_defaults_follow_the_design() -> None:
    config = parse([])
    assert (config.host, config.grpc_port, config.metrics_port) == ("0.0.0.0", 8001, 8002)
    assert config.models == ("alexnet", "vgg16", "resnet101")
    assert (config.weights, config.device) == ("pretrained", "auto")


def test_environment_variables_set_options_and_flags_win() -> None:
    environ = {
        "VISION_SERVE_MAX_BATCH_SIZE": "7",
        "VISION_SERVE_MODELS": "alexnet,resnet101",
        "VISION_SERVE_CHANNELS_LAST": "true",
        "VISION_SERVE_GRPC_PORT": "9001",
        "VISION_SERVE_MODEL_STORE": "/tmp/store",
    }
    config = parse(["--grpc-port", "9100"], environ)
    assert config.batching.max_batch_size == 7
    assert config.models == ("alexnet", "resnet101")
    assert config.channels_last is True
    assert config.grpc_port == 9100
    assert str(config.model_store) == "/tmp/store"


@pytest.mark.parametrize(
    "argv", [["--max-batch-size", "0"], ["--grpc-port", "70000"], ["--dtype", "int8"], ["--max-queue-delay-ms", "-1"]]
)
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)


def test_environment_values_are_checked_like_flags() -> None:
    with pytest.raises(SystemExit):
        parse([], {"VISION_SERVE_DTYPE": "half"})


def test_registry_has_the_three_models_with_weight_metadata() -> None:
    # tests/tiny.py registers a test model in the test process; the server's own are these three.
    assert [name for name in list_models() if name != TINY] == ["alexnet", "resnet101", "vgg16"]
    for name in list_models():
        spec = get_model_spec(name)
        assert spec.num_classes == 1000 and spec.categories[0] == "tench"
        assert spec.crop_size == 224


def test_random_weights_are_seeded_and_repeatable() -> None:
    spec = get_model_spec("alexnet")
    first = build_model(spec, WeightsSource.parse("random")).state_dict()
    second = build_model(spec, WeightsSource.parse("random")).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ["alexnet", "resnet101"])
def test_random_weights_fill_every_tensor(name: str) -> None:
    """The network is built without storage and then filled: nothing may stay unset."""
    model = build_model(get_model_spec(name), WeightsSource.parse("random"))
    for key, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu" and torch.isfinite(tensor).all(), key
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # moved a tenth of the way by the calibration pass
            assert module.running_var is not None and bool((module.running_var > 0).all())


def test_weights_directory_keeps_the_networks_dtype_and_checks_every_key(tmp_path) -> None:
    # The tiny network: the loading is the same for every model, and its state dict is kilobytes
    # where AlexNet's is a quarter of a gigabyte, written four times.
    spec = get_model_spec(TINY)
    reference = build_model(spec, WeightsSource.parse("random"))
    torch.save({k: v.double() for k, v in reference.state_dict().items()}, tmp_path / f"{TINY}.pth")
    loaded = build_model(spec, WeightsSource.parse(str(tmp_path)))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded(image), reference(image), atol=1e-6)

    state = reference.state_dict()
    last = list(state)[-1]  # the last layer's bias, classifier.2.bias
    for broken in (
        {k: v for k, v in state.items() if k != last},  # a key missing
        {**state, "classifier.7.weight": torch.zeros(1)},  # a key too many
        {**state, last: torch.zeros(10)},  # a wrong shape
    ):
        torch.save(broken, tmp_path / f"{TINY}.pth")
        with pytest.raises(WeightsUnavailableError, match="state dict"):
            build_model(spec, WeightsSource.parse(str(tmp_path)))


def test_weights_directory_errors_say_what_to_do(tmp_path) -> None:
    spec = get_model_spec("alexnet")
    with pytest.raises(WeightsUnavailableError, match=r"alexnet\.pth"):
        build_model(spec, WeightsSource.parse(str(tmp_path)))
    torch.save({"not": torch.zeros(1)}, tmp_path / "alexnet.pth")
    with pytest.raises(WeightsUnavailableError, match="state dict"):
        build_model(spec, WeightsSource.parse(str(tmp_path)))
    with pytest.raises(WeightsUnavailableError, match="neither"):
        WeightsSource.parse(str(tmp_path / "missing"))


def _offline_env(tmp_path) -> dict[str, str]:
    # A proxy on a closed loopback port makes every download fail at once, online or not.
    return {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }


def test_fetch_weights_failure_explains_how_to_pre_seed(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "fetch-weights", "--models", "alexnet"],
        capture_output=True,
        text=True,
        env=_offline_env(tmp_path),
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "vision-serve: error: cannot get pretrained weights for alexnet (" in result.stderr
    assert "TORCH_HOME" in result.stderr and "--weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_plot_hint_installs_what_the_plot_extra_names() -> None:
    """The hint works from a checkout and from PyPI alike: it names the extra's own requirement."""
    import tomllib

    from vision_client import _plot

    extra = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"pip install '{extra['plot'][0]}'" == _plot.INSTALL_HINT
