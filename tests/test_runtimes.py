"""Runtimes: logits equal torchvision's under every runtime, the export cache, runtime choice.

The server tests run under the default runtime (``auto``: ONNX Runtime on CPUs); exported
networks are cached once per test session (``VISION_SERVE_RUNTIME_CACHE``, see conftest).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as triton
from PIL import Image

from service.config import (
    ONNXRUNTIME,
    OPENVINO,
    RUNTIMES,
    SPIN_ALWAYS,
    SPIN_CHOICES,
    SPIN_NEVER,
    SPIN_RUN,
    TORCH,
    RuntimeConfig,
    ServeConfig,
)
from service.engine.runtime import ModelInstance
from service.errors import FailedPreconditionError
from service.models import WeightsSource, build_model, get_model_spec
from service.runtimes.export import ENTRY_FILE, ENTRY_FILES, MODEL_FILE, WEIGHTS_FILE, ExportCache, state_digest
from service.runtimes.onnxruntime_backend import OnnxRuntimeBackend
from service.runtimes.openvino_backend import OpenVinoBackend
from service.runtimes.select import BackendLoader, RuntimeOptions, candidates
from tests.conftest import cosine, session_runtime_cache
from tests.inprocess import InProcessServer
from vision_client import Client
from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

MODELS = ("alexnet", "vgg16", "resnet101")
CPU = torch.device("cpu")


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    """The exactness the runtimes promise: relative max error < 1e-3, cosine > 0.9999."""
    assert got.shape == expected.shape and got.dtype == np.float32
    relative = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert relative < 1e-3, relative
    assert cosine(got, expected) > 0.9999


@pytest.fixture(scope="module")
def all_weights(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Path:
    """The session's AlexNet and ResNet101 state dicts plus a seeded VGG16."""
    directory = tmp_path_factory.mktemp("all-weights")
    for name in ("alexnet", "resnet101"):
        (directory / f"{name}.pth").symlink_to(weights_dir / f"{name}.pth")
    torch.manual_seed(4321)
    torch.save(get_model_spec("vgg16").build(pretrained=False).state_dict(), directory / "vgg16.pth")
    return directory


def reference(weights: Path, name: str) -> torch.nn.Module:
    return build_model(get_model_spec(name), WeightsSource.parse(str(weights)))


@pytest.fixture(scope="module")
def default_server(all_weights: Path) -> Iterator[InProcessServer]:
    """All three models under the default runtime."""
    config = ServeConfig(
        models=MODELS,
        weights=str(all_weights),
        model_store=None,
        runtime=RuntimeConfig(cache_dir=session_runtime_cache()),
    )
    with InProcessServer(config) as server:
        yield server


@pytest.mark.parametrize("name", MODELS)
def test_default_runtime_matches_torchvision_for_image_and_pixels(
    default_server: InProcessServer, all_weights: Path, photos: dict[str, bytes], name: str
) -> None:
    net = reference(all_weights, name)
    transforms = get_model_spec(name).transforms()
    jpegs = [photos["china"], photos["flower-crop"]]
    pixels = torch.stack([transforms(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    odd = torch.randn(1, 3, 256, 300)  # PIXELS of another size: the export's height and width are dynamic
    with torch.inference_mode():
        expected_images = net(pixels).numpy()
        expected_odd = net(odd).numpy()
    with triton.InferenceServerClient(default_server.target) as client:
        image = triton.InferInput("IMAGE", [len(jpegs)], "BYTES")
        image.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
        assert_close(client.infer(name, [image]).as_numpy("LOGITS"), expected_images)
        for batch, expected in ((pixels, expected_images), (odd, expected_odd)):
            tensor = triton.InferInput("PIXELS", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch.numpy())
            assert_close(client.infer(name, [tensor]).as_numpy("LOGITS"), expected)


def test_models_rpc_and_metrics_report_the_runtime(default_server: InProcessServer) -> None:
    with grpc.insecure_channel(default_server.target) as channel:
        reply = models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(without_labels=True))
    assert {m.name: m.runtime for m in reply.models} == dict.fromkeys(MODELS, ONNXRUNTIME)
    text = urllib.request.urlopen(default_server.metrics_url, timeout=10).read().decode()
    for name in MODELS:
        assert f'vision_model_runtime_info{{device="cpu",model="{name}",runtime="onnxruntime"}} 1.0' in text
        assert f'vision_model_ready{{model="{name}"}} 1.0' in text


def test_the_servers_runtime_threads_spin_only_during_a_forward_pass(
    default_server: InProcessServer, alexnet: torch.nn.Module
) -> None:
    """Threads still spinning between batches would take the cores that decode images and run the
    protocol; each ``--runtime-spin`` choice reaches the session."""
    server = default_server.server
    assert server is not None
    for name in MODELS:
        backends = [instance.backend for instance in server.repository.get(name).instances]
        assert backends and all(isinstance(b, OnnxRuntimeBackend) and b.spin == SPIN_RUN for b in backends)
    spec = get_model_spec("alexnet")
    pixels = torch.randn(1, 3, 224, 224)
    for spin in SPIN_CHOICES:
        options = RuntimeOptions(runtime=ONNXRUNTIME, cache_dir=session_runtime_cache(), spin=spin)
        backend = BackendLoader(spec, alexnet, options).load(ONNXRUNTIME, CPU, torch.float32)
        assert isinstance(backend, OnnxRuntimeBackend) and backend.spin == spin
        with torch.inference_mode():
            assert_close(ModelInstance(backend).forward([pixels]), alexnet(pixels).numpy())


def test_features_run_through_the_runtime(default_server: InProcessServer, all_weights: Path) -> None:
    """Fine-tuning extracts features through the same session as inference."""
    from service.engine.dataplane import InferenceInput

    server = default_server.server
    assert server is not None
    net = reference(all_weights, "resnet101")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = get_model_spec("resnet101").features(net)(pixels).numpy()

    async def features() -> np.ndarray:
        model = server.builtin.features_model("resnet101")
        assert [i.runtime for i in model.instances] == [ONNXRUNTIME]
        return await server.dataplane.infer_model(model, InferenceInput(pixels=pixels.numpy()))

    assert_close(default_server.call(features()), expected)


# -- each runtime on its own ---------------------------------------------------------------


@pytest.fixture(scope="module")
def alexnet(weights_dir: Path) -> torch.nn.Module:
    return reference(weights_dir, "alexnet")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_gives_torchvision_logits_and_features(alexnet: torch.nn.Module, runtime: str) -> None:
    spec = get_model_spec("alexnet")
    loader = BackendLoader(spec, alexnet, RuntimeOptions(runtime=runtime, cache_dir=session_runtime_cache()))
    instance = ModelInstance(loader.load(runtime, CPU, torch.float32))
    assert instance.runtime == runtime
    parts = [torch.randn(2, 3, 224, 224), torch.randn(1, 3, 224, 224)]
    odd = [torch.randn(2, 3, 300, 241)]
    with torch.inference_mode():
        assert_close(instance.forward(parts), alexnet(torch.cat(parts)).numpy())
        assert_close(instance.forward(odd), alexnet(odd[0]).numpy())
        features = spec.features(alexnet)(torch.cat(parts))
        assert_close(instance.features().forward(parts), features.numpy())
        head = torch.nn.Linear(4096, 3)
        assert_close(instance.with_head(head).forward(parts), head(features).numpy())


# -- the export cache ------------------------------------------------------------------------


@pytest.fixture
def cache_copy(tmp_path: Path, alexnet: torch.nn.Module) -> tuple[ExportCache, Path]:
    """A cache of the test's own holding a copy of the session's AlexNet export."""
    spec = get_model_spec("alexnet")
    digest = state_digest(alexnet)
    shared = ExportCache(session_runtime_cache())
    shared.onnx_file(spec, alexnet, digest)  # exported once per session
    cache = ExportCache(tmp_path / "cache")
    entry = cache.entry("alexnet", digest)
    entry.parent.mkdir(parents=True)
    shutil.copytree(shared.entry("alexnet", digest), entry)
    assert cache.check(entry) is None
    return cache, entry


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte of ``path`` in place: same size, other content."""
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def test_an_entry_keeps_its_weights_outside_the_graph(cache_copy: tuple[ExportCache, Path]) -> None:
    """The graph names its initializers in ``weights.bin``: a session need not parse them."""
    _, entry = cache_copy
    assert sorted(p.name for p in entry.iterdir() if p.is_file()) == sorted([ENTRY_FILE, *ENTRY_FILES])
    graph = onnx.load(str(entry / MODEL_FILE), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert len(external) >= 14 and all(4 * int(np.prod(t.dims)) < 1024 for t in inline)  # two small biases
    assert {entry_.value for t in external for entry_ in t.external_data if entry_.key == "location"} == {WEIGHTS_FILE}
    assert (entry / MODEL_FILE).stat().st_size < 100_000 < 200_000_000 < (entry / WEIGHTS_FILE).stat().st_size


@pytest.mark.parametrize("name", ENTRY_FILES)
def test_incomplete_or_tampered_entries_are_detected(cache_copy: tuple[ExportCache, Path], name: str) -> None:
    cache, entry = cache_copy
    flip_byte(entry / name, 1000)
    assert f"{name} does not match its recorded SHA-256" in (cache.check(entry) or "")
    (entry / name).write_bytes(b"truncated")
    assert f"{name} has 9 bytes, expected" in (cache.check(entry) or "")
    (entry / name).unlink()
    os.mkfifo(entry / name)  # opened without blocking and refused by fstat (no hang)
    assert f"{name} is not a regular file" in (cache.check(entry) or "")
    (entry / name).unlink()
    assert f"{name} is missing" in (cache.check(entry) or "")
    meta = json.loads((entry / ENTRY_FILE).read_text())
    (entry / ENTRY_FILE).write_text(json.dumps({**meta, "format": 1}))
    assert "another version" in (cache.check(entry) or "")
    (entry / ENTRY_FILE).write_text("{not json")
    assert cache.check(entry) is not None
    (entry / ENTRY_FILE).unlink()
    assert ENTRY_FILE in (cache.check(entry) or "")
    assert cache.check(entry.with_name("absent")) is not None


def test_a_corrupt_entry_is_rebuilt_and_serves_exact_logits(
    cache_copy: tuple[ExportCache, Path], alexnet: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    cache, entry = cache_copy
    (entry / MODEL_FILE).write_bytes(b"\x00" * 4096)  # a torn write: garbage of the wrong size
    loader = BackendLoader(get_model_spec("alexnet"), alexnet, RuntimeOptions(ONNXRUNTIME, cache.root))
    with caplog.at_level(logging.WARNING, logger="service.runtimes.export"):
        instance = ModelInstance(loader.load(ONNXRUNTIME, CPU, torch.float32))
    assert "unusable" in caplog.text and "exporting again" in caplog.text
    assert cache.check(entry) is None
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary or discarded leftovers
    batch = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert_close(instance.forward([batch]), alexnet(batch).numpy())


def test_other_weights_get_another_entry(alexnet: torch.nn.Module) -> None:
    other = get_model_spec("alexnet").build(pretrained=False)
    assert state_digest(other) != state_digest(alexnet)
    assert ExportCache(Path("/c")).entry("alexnet", state_digest(other)) != ExportCache(Path("/c")).entry(
        "alexnet", state_digest(alexnet)
    )
    assert f"torch{torch.__version__}".replace("+", "_") in ExportCache(Path("/c")).entry("alexnet", "ab" * 32).name


def test_an_unwritable_cache_fails_with_a_clear_message(tmp_path: Path, alexnet: torch.nn.Module) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    loader = BackendLoader(get_model_spec("alexnet"), alexnet, RuntimeOptions(ONNXRUNTIME, blocker / "cache"))
    with pytest.raises(FailedPreconditionError, match="--runtime-cache"):
        loader.load(ONNXRUNTIME, CPU, torch.float32)


# -- choosing a runtime ----------------------------------------------------------------------


def test_auto_prefers_onnxruntime_on_cpu_and_torch_on_cuda() -> None:
    assert candidates("auto", CPU) == [ONNXRUNTIME]
    assert candidates("auto", torch.device("cuda", 0)) == [TORCH]
    assert candidates("fastest", CPU) == [ONNXRUNTIME, OPENVINO, TORCH]
    assert candidates("openvino", CPU) == [OPENVINO]
    with pytest.raises(FailedPreconditionError, match="choose one of auto, torch, onnxruntime, openvino, fastest"):
        candidates("tensorrt", CPU)


def test_runtimes_that_cannot_run_on_cuda_say_what_to_do(alexnet: torch.nn.Module) -> None:
    cuda = torch.device("cuda", 0)
    with pytest.raises(FailedPreconditionError, match=r"CPU only.*--runtime torch"):
        OpenVinoBackend.require(cuda)
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has its CUDA execution provider")
    with pytest.raises(FailedPreconditionError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        OnnxRuntimeBackend.require(cuda)
    loader = BackendLoader(get_model_spec("alexnet"), alexnet, RuntimeOptions(ONNXRUNTIME, Path("/nonexistent")))
    with pytest.raises(FailedPreconditionError, match="float32 only"):
        loader.load(ONNXRUNTIME, CPU, torch.float16)


def test_fastest_times_every_runtime_and_keeps_one(serve_inprocess, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.engine.factory"):
        server = serve_inprocess(runtime=RuntimeConfig(name="fastest", cache_dir=session_runtime_cache()))
    line = next(r.getMessage() for r in caplog.records if "--runtime fastest" in r.getMessage())
    assert all(name in line for name in RUNTIMES), line
    with Client(server.target) as client:
        assert client.classify(np.zeros((224, 224, 3), dtype=np.uint8), model="alexnet", top_k=1)
    with grpc.insecure_channel(server.target) as channel:
        info = models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(name="alexnet"))
    assert info.runtime in RUNTIMES and line.endswith(f"keeping {info.runtime}")


def test_torch_runtime_serves_and_reports_itself(serve_inprocess, weights_dir: Path) -> None:
    server = serve_inprocess(runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()))
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'vision_model_runtime_info{device="cpu",model="alexnet",runtime="torch"} 1.0' in text


# -- the loader's entry points for unloading and loading one built-in model -----------------------


def test_unload_then_load_serves_the_model_again_and_drops_its_runtime_series(serve_inprocess) -> None:
    server = serve_inprocess()
    assert server.server is not None
    repository, builtin = server.server.repository, server.server.builtin
    pixels = np.zeros((1, 3, 224, 224), dtype=np.float32)
    tensor = triton.InferInput("PIXELS", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(pixels)
    with triton.InferenceServerClient(server.target) as client:
        before = client.infer("alexnet", [tensor]).as_numpy("LOGITS")
        server.call(builtin.unload("alexnet"))
        unloaded = repository.get("alexnet")
        assert unloaded.workers == [] and unloaded.state.value == "UNAVAILABLE"
        with pytest.raises(Exception, match="unavailable: unloaded"):
            client.infer("alexnet", [tensor])
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert 'vision_model_ready{model="alexnet"} 0.0' in text and "vision_model_runtime_info{" not in text
        server.call(builtin.load("alexnet"), timeout=240)
        np.testing.assert_allclose(client.infer("alexnet", [tensor]).as_numpy("LOGITS"), before, rtol=0, atol=1e-5)


# -- options ----------------------------------------------------------------------------------


def test_runtime_options_from_flags_and_environment(tmp_path: Path) -> None:
    from service.cli import build_serve_parser, config_from_args

    def parse(argv: list[str], environ: dict[str, str]) -> RuntimeConfig:
        return config_from_args(build_serve_parser(environ).parse_args(argv)).runtime

    default = parse([], {"XDG_CACHE_HOME": str(tmp_path)})
    assert default == RuntimeConfig("auto", tmp_path / "vision-serving" / "runtimes", 0)
    assert parse([], {"HOME": str(tmp_path)}).cache_dir is not None
    environ = {
        "VISION_SERVE_RUNTIME": "openvino",
        "VISION_SERVE_RUNTIME_CACHE": "/c",
        "VISION_SERVE_RUNTIME_THREADS": "3",
    }
    assert parse([], environ) == RuntimeConfig("openvino", Path("/c"), 3)
    assert parse(["--runtime", "torch", "--runtime-threads", "1"], environ) == RuntimeConfig("torch", Path("/c"), 1)
    with pytest.raises(SystemExit, match="--runtime 'tensorrt': choose one of auto, torch"):
        parse([], {"VISION_SERVE_RUNTIME": "tensorrt"})
    assert parse([], {}).spin == SPIN_RUN
    assert parse(["--runtime-spin", "never"], {}).spin == SPIN_NEVER
    assert parse([], {"VISION_SERVE_RUNTIME_SPIN": "always"}).spin == SPIN_ALWAYS
    assert parse(["--runtime-spin", "run"], {"VISION_SERVE_RUNTIME_SPIN": "never"}).spin == SPIN_RUN
    with pytest.raises(SystemExit, match="--runtime-spin 'yes': choose one of run, always, never"):
        parse([], {"VISION_SERVE_RUNTIME_SPIN": "yes"})
    for bad in (["--runtime", "tensorrt"], ["--runtime-threads", "-1"], ["--runtime-spin", "1"]):
        with pytest.raises(SystemExit):
            parse(bad, {})


def test_a_runtime_that_cannot_run_stops_the_server_at_start_with_its_reason() -> None:
    from service.engine.server import VisionServer

    with pytest.raises(FailedPreconditionError, match="choose one of"):
        VisionServer(ServeConfig(models=("alexnet",), model_store=None, runtime=RuntimeConfig(name="tensorrt")))


def test_an_entry_that_is_not_a_directory_is_replaced(tmp_path: Path, alexnet: torch.nn.Module) -> None:
    cache = ExportCache(tmp_path)
    entry = cache.entry("alexnet", state_digest(alexnet))
    entry.parent.mkdir(parents=True)
    entry.write_text("a stray file where the entry belongs")
    assert cache.check(entry) is not None
    cache.discard(entry)
    assert list(entry.parent.iterdir()) == []
