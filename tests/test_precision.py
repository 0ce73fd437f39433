"""Reduced precision (``--dtype``): the per-model syntax, the capability probe and its refusals,
bfloat16 served on this CPU through each runtime that computes it, its agreement with float32
as Models, ModelConfig and the metrics report it, and the floor that refuses a model.

The bfloat16 tests need a CPU with native bfloat16 (``avx512_bf16`` or ``amx_bf16``); elsewhere
they are skipped with that reason, and the refusal tests (which override the probe with
``VISION_SERVING_CPU_FLAGS``) still run.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from PIL import Image

from service.config import ONNXRUNTIME, OPENVINO, TORCH, DtypeChoice, RuntimeConfig, ServeConfig
from service.engine.devices import CPU_FLAGS_ENV, native_precisions, resolve_dtype
from service.engine.precision import SKLEARN_SOURCE, sample_batch
from service.errors import FailedPreconditionError
from service.models import WeightsSource, build_model, get_model_spec
from service.options import build_serve_parser, config_from_args
from service.runtimes.select import candidates
from tests.conftest import ROOT, cosine, session_runtime_cache
from tests.tiny import TINY
from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

CPU = torch.device("cpu")
NATIVE_BF16 = "bfloat16" in native_precisions(CPU)
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has neither avx512_bf16 nor amx_bf16")
# The bound this file holds bfloat16 logits to: cosine with float32's, image by image.
MIN_COSINE = 0.999


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    return config_from_args(build_serve_parser(environ or {}).parse_args(argv))


# -- the syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "models"),
    [
        ("float32", "float32", ()),
        ("bfloat16", "bfloat16", ()),
        (" BFloat16 ", "bfloat16", ()),
        ("resnet101=bfloat16", "float32", (("resnet101", "bfloat16"),)),
        ("float32,resnet101=bfloat16", "float32", (("resnet101", "bfloat16"),)),
        ("alexnet=float32, bfloat16 ,vgg16=float16", "bfloat16", (("alexnet", "float32"), ("vgg16", "float16"))),
    ],
)
def test_dtype_takes_a_default_and_per_model_precisions(text: str, default: str, models: tuple) -> None:
    choice = DtypeChoice.parse(text)
    assert (choice.default, choice.models) == (default, models)
    assert parse(["--dtype", text]).dtype == choice == parse([], {"VISION_SERVE_DTYPE": text}).dtype
    assert DtypeChoice.parse(str(choice)) == choice  # the docs and --help show what parses back
    for name, precision in models:
        assert choice.for_model(name) == precision and choice.option_text(name) == f"{name}={precision}"
    assert choice.for_model("some-other-model") == default and choice.option_text("some-other-model") == default


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "name a precision"),
        ("float64", "'float64' in 'float64' is not a precision; choose one of float32, bfloat16, float16"),
        ("fp16", "not a precision"),
        ("float32,bfloat16", "two default precisions"),
        ("float32,,resnet101=bfloat16", "empty item"),
        ("resnet101=", "is not a precision"),
        ("=bfloat16", "write model=precision"),
        ("a=b=bfloat16", "write model=precision"),
        ("resnet101=bfloat16,resnet101=float32", "names resnet101 twice"),
        ("resnet10=bfloat16", "resnet10: not a built-in model; name one of"),
    ],
)
def test_a_bad_dtype_is_refused_with_what_to_write(text: str, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--dtype", text])
    assert problem in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse([], {"VISION_SERVE_DTYPE": text})
    assert problem in capsys.readouterr().err


def test_the_floor_is_a_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse([]).min_precision_agreement == 0.99
    assert parse(["--min-precision-agreement", "0"]).min_precision_agreement == 0.0
    for bad in ("1.5", "-0.1", "high"):
        with pytest.raises(SystemExit):
            parse(["--min-precision-agreement", bad])


# -- the probe and the refusals ---------------------------------------------------------------


def test_the_probe_reads_the_cpu_flags_and_the_hook_replaces_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_FLAGS_ENV, "sse4_2 avx2 avx512f")
    assert native_precisions(CPU) == ("float32",)
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx512f amx_bf16")
    assert native_precisions(CPU) == ("float32", "bfloat16")
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx512_bf16")
    assert native_precisions(CPU) == ("float32", "bfloat16")
    monkeypatch.delenv(CPU_FLAGS_ENV)
    flags = Path("/proc/cpuinfo").read_text()
    assert ("avx512_bf16" in flags or "amx_bf16" in flags) == NATIVE_BF16


def test_float16_on_a_cpu_is_refused_with_what_it_offers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx512_bf16 avx512_fp16 amx_fp16")
    with pytest.raises(FailedPreconditionError) as refused:
        resolve_dtype("float16", CPU)
    assert str(refused.value) == (
        "--dtype float16: the CPU does not compute float16 natively (float16 is served on GPUs only); "
        "it offers float32, bfloat16: choose one of those (per model: --dtype float32,resnet101=bfloat16)"
    )
    with pytest.raises(FailedPreconditionError, match="float16 is served on GPUs only"):
        server_of(ServeConfig(models=("alexnet",), dtype=DtypeChoice.parse("alexnet=float16")))


def test_bfloat16_without_native_support_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_FLAGS_ENV, "sse4_2 avx2 avx512f avx512bw")
    assert resolve_dtype("float32", CPU) == torch.float32
    for runtime in ("auto", "torch", "openvino", "fastest"):
        config = ServeConfig(
            models=("alexnet", "resnet101"),
            dtype=DtypeChoice.parse("float32,resnet101=bfloat16"),
            runtime=RuntimeConfig(name=runtime),
        )
        with pytest.raises(FailedPreconditionError) as refused:
            server_of(config)
        assert str(refused.value) == (
            "--dtype resnet101=bfloat16: the CPU does not compute bfloat16 natively (its flags have neither "
            "avx512_bf16 nor amx_bf16; emulated, bfloat16 is slower than float32); it offers float32 only: "
            "use --dtype float32"
        )


def test_the_command_line_says_why_and_leaves_no_traceback(tmp_path: Path) -> None:
    """The refusal as an operator sees it: one line on stderr, a failing exit status."""
    environ = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        CPU_FLAGS_ENV: "avx2",
        "VISION_SERVE_RUNTIME_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "service", "--models", "alexnet", "--weights", "random", "--dtype", "bfloat16"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--dtype bfloat16: the CPU does not compute bfloat16 natively" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_runtimes_are_chosen_by_precision_only_when_it_is_reduced() -> None:
    assert candidates("auto", CPU) == [ONNXRUNTIME]
    assert candidates("auto", CPU, "float32") == [ONNXRUNTIME]
    assert candidates("fastest", CPU, "float32") == [ONNXRUNTIME, OPENVINO, TORCH]
    assert candidates("auto", CPU, "bfloat16") == [OPENVINO]
    assert candidates("fastest", CPU, "bfloat16") == [OPENVINO, TORCH]
    assert candidates("torch", CPU, "bfloat16") == [TORCH]
    with pytest.raises(FailedPreconditionError) as refused:
        candidates("onnxruntime", CPU, "bfloat16", asked="resnet101=bfloat16")
    assert str(refused.value) == (
        "--runtime onnxruntime computes float32 only on cpu, not resnet101=bfloat16 (it has no native bfloat16 "
        "path); use --runtime openvino or torch (they compute it there), or --dtype float32"
    )


def server_of(config: ServeConfig) -> object:
    from service.engine.server import VisionServer

    return VisionServer(config)


@needs_bf16
def test_openvino_is_pinned_to_float32_and_set_to_bf16_when_asked(weights_dir: Path) -> None:
    from service.runtimes.openvino_backend import OpenVinoBackend
    from service.runtimes.select import BackendLoader, RuntimeOptions

    spec = get_model_spec("alexnet")
    net = build_model(spec, WeightsSource.parse(str(weights_dir)))
    loader = BackendLoader(spec, net, RuntimeOptions(runtime=OPENVINO, cache_dir=session_runtime_cache()))
    batch = sample_batch(spec)
    with torch.inference_mode():
        expected = net(batch).numpy()
    for dtype, hint in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        backend = loader.load(OPENVINO, CPU, dtype)
        assert isinstance(backend, OpenVinoBackend) and backend.compiled_precision == hint
        got = backend.run(backend.gather([batch]), "logits").numpy()
        worst = min(cosine(row, want) for row, want in zip(got, expected, strict=True))
        if dtype == torch.float32:
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
        else:
            assert MIN_COSINE <= worst < 1.0


# -- bfloat16 served ---------------------------------------------------------------------------


def bf16_config(weights_dir: Path, runtime: str, dtype: str, **overrides: object) -> ServeConfig:
    settings: dict[str, object] = {
        "models": ("alexnet",),
        "weights": str(weights_dir),
        "model_store": None,
        "drain_seconds": 5.0,
        "dtype": DtypeChoice.parse(dtype),
        "runtime": RuntimeConfig(name=runtime, cache_dir=session_runtime_cache()),
    }
    settings.update(overrides)
    return ServeConfig(**settings)  # type: ignore[arg-type]


@needs_bf16
@pytest.mark.e2e
@pytest.mark.parametrize(("runtime", "dtype"), [(OPENVINO, "bfloat16"), (TORCH, "float32,alexnet=bfloat16")])
def test_bfloat16_is_served_and_its_agreement_reported(
    weights_dir: Path, photos: dict[str, bytes], runtime: str, dtype: str
) -> None:
    from tests.inprocess import InProcessServer

    net = build_model(get_model_spec("alexnet"), WeightsSource.parse(str(weights_dir)))
    transforms = get_model_spec("alexnet").transforms()
    jpegs = [photos["china"], photos["flower-crop"]]
    pixels = torch.stack([transforms(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    with torch.inference_mode():
        expected = net(pixels).numpy()
    with InProcessServer(bf16_config(weights_dir, runtime, dtype)) as server:
        with triton.InferenceServerClient(server.target) as client:
            image = triton.InferInput("IMAGE", [len(jpegs)], "BYTES")
            image.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
            tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
            tensor.set_data_from_numpy(pixels.numpy())
            for request in (image, tensor):
                got = client.infer("alexnet", [request]).as_numpy("LOGITS")
                assert got.dtype == np.float32 and got.shape == expected.shape
                for row, want in zip(got, expected, strict=True):
                    assert MIN_COSINE <= cosine(row, want) < 1.0  # reduced, and close
            parameters = client.get_model_config("alexnet").config.parameters
        with grpc.insecure_channel(server.target) as channel:
            info = models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(name="alexnet"))
        metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert (info.runtime, info.precision) == (runtime, "bfloat16")
    agreement = info.precision_agreement
    assert agreement.images == len(sample_batch(get_model_spec("alexnet"))) == 12
    assert agreement.images_source == SKLEARN_SOURCE  # scikit-learn is installed with the tests
    assert MIN_COSINE <= agreement.min_cosine <= agreement.mean_cosine < 1.0
    assert 0.0 <= agreement.top1 <= 1.0 and 0.0 < agreement.max_relative_error < 0.1
    assert parameters["precision"].string_value == "bfloat16"
    assert float(parameters["precision_agreement_min_cosine"].string_value) == agreement.min_cosine
    assert float(parameters["precision_agreement_top1"].string_value) == agreement.top1
    assert parameters["precision_agreement_images_source"].string_value == SKLEARN_SOURCE
    for measure, value in (("min_cosine", agreement.min_cosine), ("top1", agreement.top1)):
        line = f'vision_precision_agreement{{dtype="bfloat16",measure="{measure}",model="alexnet"}} '
        assert line in metrics
        assert float(metrics.split(line)[1].split("\n")[0]) == pytest.approx(value)
    if runtime == OPENVINO:  # its compiled blobs are kept apart from float32's
        blobs = [p.name for p in session_runtime_cache().glob("alexnet/*/openvino-*")]
        assert any(name.endswith("-bfloat16") for name in blobs), blobs


@pytest.mark.e2e
def test_float32_is_exact_and_reports_no_agreement(serve_inprocess) -> None:
    server = serve_inprocess(runtime=RuntimeConfig(name=TORCH, cache_dir=session_runtime_cache()))
    with grpc.insecure_channel(server.target) as channel:
        info = models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(name="alexnet"))
    assert info.precision == "float32" and not info.HasField("precision_agreement")
    with triton.InferenceServerClient(server.target) as client:
        parameters = client.get_model_config("alexnet").config.parameters
    assert {key: value.string_value for key, value in parameters.items()} == {"precision": "float32"}
    assert "vision_precision_agreement{" not in urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


@needs_bf16
@pytest.mark.e2e
def test_a_model_under_the_floor_is_not_served_in_that_precision(serve_inprocess) -> None:
    """The tiny model in bfloat16 against a floor no reduced precision reaches: refused with the figures."""
    server = serve_inprocess(
        wait_loaded=False,
        models=(TINY,),
        weights="random",
        dtype=DtypeChoice.parse(f"float32,{TINY}=bfloat16"),
        min_precision_agreement=1.0,
        runtime=RuntimeConfig(name=TORCH, cache_dir=session_runtime_cache()),
    )
    assert server.server is not None
    with pytest.raises(FailedPreconditionError) as refused:
        server.call(server.server.wait_loaded(), timeout=120)
    message = str(refused.value)
    assert message.startswith(f"{TINY} is not served in --dtype {TINY}=bfloat16: its logits agree with float32's")
    assert "under --min-precision-agreement 1 (cosine min" in message and "or lower the floor" in message
    model = server.server.repository.get(TINY)
    assert model.state.value == "UNAVAILABLE" and model.reason == message


@needs_bf16
@pytest.mark.e2e
def test_a_fine_tuned_head_is_served_in_its_base_models_precision(serve_inprocess) -> None:
    """Trained in float32 as every head is, served on the base's bfloat16 backbone; its answers
    match the same head run in float32 on float32 features for most held-out digits."""
    from tests.support.finetune_data import digits
    from vision_client import Client, FineTuneConfig

    server = serve_inprocess(
        models=(TINY,),
        weights="random",
        dtype=DtypeChoice.parse(f"{TINY}=bfloat16"),
        runtime=RuntimeConfig(name=TORCH, cache_dir=session_runtime_cache()),
    )
    images, targets = digits()
    train = [(image, str(target)) for image, target in zip(images[:200], targets[:200], strict=True)]
    held_out = images[200:264]
    with Client(server.target, timeout=120) as client:
        result = client.fine_tune(FineTuneConfig(TINY, "digits-bf16", epochs=5), train, timeout=300)
        assert result.succeeded, result.error
        served = client.logits(held_out, model="digits-bf16")
    with grpc.insecure_channel(server.target) as channel:
        info = models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(name="digits-bf16"))
    assert (info.precision, info.base_model) == ("bfloat16", TINY) and not info.HasField("precision_agreement")
    assert server.server is not None
    head = server.server.repository.get("digits-bf16").instances[0].head
    assert head is not None and next(head.parameters()).dtype == torch.bfloat16
    # The same head in float32 on the float32 network's features.
    spec = get_model_spec(TINY)
    net = build_model(spec, WeightsSource.parse("random"))
    decode = spec.transforms()
    batch = torch.stack([decode(Image.open(io.BytesIO(image)).convert("RGB")) for image in held_out])
    with torch.inference_mode():
        reference = copy.deepcopy(head).float()(spec.features(net)(batch)).numpy()
    assert np.isfinite(served).all() and served.shape == reference.shape
    assert np.mean(served.argmax(1) == reference.argmax(1)) >= 0.9
