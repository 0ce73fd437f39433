"""Triton's model API through the real tritonclient: ModelConfig, ModelStatistics, load and unload."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.utils import InferenceServerException

from service.config import BatchingConfig
from tests.conftest import encode
from tests.metrics_util import sample_value, scrape

TOKEN = "load-unload-token"
DATATYPES = {"BYTES": triton_config.TYPE_STRING, "FP32": triton_config.TYPE_FP32}


def image_input(count: int, seed: int = 0) -> triton.InferInput:
    rng = np.random.default_rng(seed)
    images = [encode(Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)), "PNG") for _ in range(count)]
    tensor = triton.InferInput("IMAGE", [count], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def pixels_input(count: int, side: int = 224) -> triton.InferInput:
    tensor = triton.InferInput("PIXELS", [count, 3, side, side], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(count).standard_normal((count, 3, side, side), dtype=np.float32))
    return tensor


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status()


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- ModelConfig -------------------------------------------------------------


def test_model_config_is_what_the_server_runs(serve_inprocess) -> None:
    batching = BatchingConfig(max_batch_size=6, max_queue_delay_ms=12.5, max_queue_size=40)
    server = serve_inprocess(batching=batching)
    with triton.InferenceServerClient(server.target) as client:
        config = client.get_model_config("alexnet").config
        metadata = client.get_model_metadata("alexnet")
        as_json = client.get_model_config("alexnet", as_json=True)["config"]

    assert (config.name, config.platform, config.max_batch_size) == ("alexnet", "pytorch_torchvision", 6)
    assert config.dynamic_batching.max_queue_delay_microseconds == 12500
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 40
    gpus = [d.index or 0 for d in server.server.devices if d.type == "cuda"]
    expected = (
        (triton_config.ModelInstanceGroup.KIND_GPU, 1, gpus)
        if gpus
        else (triton_config.ModelInstanceGroup.KIND_CPU, 1, [])
    )
    assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [expected]
    # Inputs and outputs are the metadata's, dims without the batch dimension (max_batch_size > 0).
    for declared, described in ((config.input, metadata.inputs), (config.output, metadata.outputs)):
        assert [t.name for t in declared] == [t.name for t in described]
        for tensor, meta in zip(declared, described, strict=True):
            assert tensor.data_type == DATATYPES[meta.datatype]
            assert [-1, *tensor.dims] == list(meta.shape)
    assert [t.optional for t in config.input] == [True, True]
    assert config.input[1].format == triton_config.ModelInput.FORMAT_NCHW
    assert config.output[0].dims == [1000]
    assert as_json["max_batch_size"] == 6 and as_json["input"][0]["data_type"] == "TYPE_STRING"


def test_model_config_refuses_unknown_models_and_versions(serve_inprocess) -> None:
    server = serve_inprocess()
    with triton.InferenceServerClient(server.target) as client:
        assert status_of(lambda: client.get_model_config("vgg16")) == "StatusCode.NOT_FOUND"
        assert status_of(lambda: client.get_model_config("alexnet", model_version="7")) == "StatusCode.NOT_FOUND"
        assert status_of(lambda: client.get_model_config("")) == "StatusCode.INVALID_ARGUMENT"
        assert status_of(lambda: client.get_model_config("alexnet:features")) == "StatusCode.NOT_FOUND"
        assert client.get_model_config("alexnet", model_version="1").config.name == "alexnet"
        extensions = set(client.get_server_metadata().extensions)
    assert {"classification", "model_configuration", "statistics", "model_repository", "trace"} <= extensions


# -- ModelStatistics -----------------------------------------------------------


def test_statistics_count_requests_and_batches_exactly(serve_inprocess) -> None:
    # No batching window and one request at a time: each request is its own batch,
    # except the 6-image one, which --max-batch-size 4 splits into batches of 4 and 2.
    server = serve_inprocess(batching=BatchingConfig(max_batch_size=4, max_queue_delay_ms=0))
    started_ms = time.time() * 1000
    with triton.InferenceServerClient(server.target) as client:
        empty = client.get_inference_statistics("alexnet").model_stats[0]
        for seed in range(3):
            client.infer("alexnet", [image_input(1, seed)])
        for _ in range(2):
            client.infer("alexnet", [pixels_input(3)])
        bad = triton.InferInput("PIXELS", [1, 2, 224, 224], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2, 224, 224), dtype=np.float32))
        assert status_of(lambda: client.infer("alexnet", [bad])) == "StatusCode.INVALID_ARGUMENT"
        (before_split,) = client.get_inference_statistics("alexnet").model_stats
        client.infer("alexnet", [pixels_input(6)])
        (stats,) = client.get_inference_statistics("alexnet", "1").model_stats
        everything = client.get_inference_statistics().model_stats
        assert status_of(lambda: client.get_inference_statistics("alexnet", "2")) == "StatusCode.NOT_FOUND"
        assert status_of(lambda: client.get_inference_statistics("nope")) == "StatusCode.NOT_FOUND"
    finished_ms = time.time() * 1000

    assert (empty.inference_count, empty.execution_count, empty.last_inference) == (0, 0, 0)
    assert [s.name for s in everything] == ["alexnet"]
    assert (stats.name, stats.version) == ("alexnet", "1")
    infer = stats.inference_stats
    assert (infer.success.count, infer.fail.count) == (6, 1)
    assert stats.inference_count == 3 + 3 + 3 + 6
    assert stats.execution_count == 3 + 2 + 2
    # Per work item (one per request, two for the split one), as Triton counts per request.
    assert infer.queue.count == infer.compute_input.count == infer.compute_infer.count == 7
    assert infer.compute_output.count == 7
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 3, 2: 1, 3: 2, 4: 1}
    assert [b.batch_size for b in stats.batch_stats] == [1, 2, 3, 4]
    for duration in (infer.success, infer.fail, infer.queue, infer.compute_input, infer.compute_infer):
        assert duration.ns > 0
    assert infer.compute_output.ns > 0
    assert (infer.cache_hit.count, infer.cache_miss.count) == (0, 0)
    # Every batch held one work item here, so the per-request sums equal the per-batch sums.
    for phase in ("compute_input", "compute_infer", "compute_output"):
        assert getattr(infer, phase).ns == sum(getattr(b, phase).ns for b in stats.batch_stats)
    # Before the split request, every request was one item: its time covers its queue and compute.
    early = before_split.inference_stats
    assert early.success.ns > early.queue.ns + early.compute_input.ns + early.compute_infer.ns + early.compute_output.ns
    assert started_ms <= stats.last_inference <= finished_ms
    # The same events as the Prometheus metrics.
    text = scrape(server.metrics_url)
    assert sample_value(text, "vision_batches_total", model="alexnet") == stats.execution_count
    assert sample_value(text, "vision_inference_images_total", model="alexnet") == stats.inference_count
    assert sample_value(text, "vision_requests_total", model="alexnet", status="OK") == infer.success.count


# -- RepositoryModelLoad / RepositoryModelUnload ------------------------------------


def _infer_threads_alive(model: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"infer-{model}-")]


def test_unload_frees_the_model_and_load_serves_it_again(serve_inprocess) -> None:
    server = serve_inprocess()
    repository = server.server.repository
    backend = weakref.ref(repository.get("alexnet").instances[0].backend)
    with triton.InferenceServerClient(server.target) as client:
        assert client.infer("alexnet", [image_input(1)]).as_numpy("LOGITS").shape == (1, 1000)
        client.unload_model("alexnet")
        client.unload_model("alexnet")  # idempotent, as Triton's

        assert not client.is_model_ready("alexnet")
        assert client.is_server_ready(), "an unloaded model does not make the server unready"
        with pytest.raises(InferenceServerException) as raised:
            client.infer("alexnet", [image_input(1)])
        error = raised.value
        assert error.status() == "StatusCode.UNAVAILABLE" and "RepositoryModelLoad" in error.message()
        (entry,) = client.get_model_repository_index().models
        assert (entry.name, entry.state) == ("alexnet", "UNAVAILABLE") and "unloaded" in entry.reason
        assert client.get_model_repository_index(as_json=True)["models"][0]["state"] == "UNAVAILABLE"
        assert health(server.target, "alexnet") == NOT_SERVING
        assert health(server.target, "") == SERVING
        gc.collect()
        assert backend() is None, "the unloaded model's network is still referenced"
        assert _infer_threads_alive("alexnet") == []

        client.load_model("alexnet")
        assert client.is_model_ready("alexnet")
        assert client.infer("alexnet", [image_input(2)]).as_numpy("LOGITS").shape == (2, 1000)
        (entry,) = client.get_model_repository_index().models
        assert (entry.state, entry.reason) == ("READY", "")
        assert health(server.target, "alexnet") == SERVING
        client.load_model("alexnet")  # loaded already: nothing to do
        assert len(_infer_threads_alive("alexnet")) == 1


def test_unload_answers_queued_requests_unavailable(serve_inprocess) -> None:
    # One image per batch and large PIXELS on the CPU: the worker runs one image while the rest wait.
    server = serve_inprocess(device="cpu", batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
    queue = server.server.repository.get("alexnet").queue
    with triton.InferenceServerClient(server.target) as client, ThreadPoolExecutor(24) as pool:
        pending = [pool.submit(client.infer, "alexnet", [pixels_input(1, side=448)]) for _ in range(24)]
        deadline = time.monotonic() + 60
        while queue.pending_images < 12 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert queue.pending_images >= 12, "the requests did not queue up"
        client.unload_model("alexnet")
        outcomes = []
        for future in pending:
            try:
                future.result(timeout=120)
                outcomes.append("OK")
            except InferenceServerException as exc:
                outcomes.append(exc.status())
                assert exc.status() != "StatusCode.UNAVAILABLE" or "unloaded" in exc.message()
    assert set(outcomes) <= {"OK", "StatusCode.UNAVAILABLE"}
    assert outcomes.count("StatusCode.UNAVAILABLE") >= 6
    assert queue.pending_images == 0
    assert sample_value(scrape(server.metrics_url), "vision_pending_images", model="alexnet") == 0


def test_load_and_unload_refuse_what_they_cannot_do(serve_inprocess) -> None:
    server = serve_inprocess()
    with triton.InferenceServerClient(server.target) as client:
        assert status_of(lambda: client.unload_model("nope")) == "StatusCode.NOT_FOUND"
        assert status_of(lambda: client.load_model("alexnet:features")) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("vgg16")
        not_started = raised.value
        assert not_started.status() == "StatusCode.NOT_FOUND" and "--models" in not_started.message()
        assert status_of(lambda: client.load_model("")) == "StatusCode.INVALID_ARGUMENT"
        assert status_of(lambda: client.load_model("alexnet", config='{"max_batch_size": 2}')) == (
            "StatusCode.INVALID_ARGUMENT"
        )
        assert client.is_model_ready("alexnet")


def test_load_and_unload_need_the_token(serve_inprocess, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    server = serve_inprocess(auth_token_file=tmp_path / "token")
    good = {"authorization": f"Bearer {TOKEN}"}
    with triton.InferenceServerClient(server.target) as client:
        assert status_of(lambda: client.unload_model("alexnet")) == "StatusCode.UNAUTHENTICATED"
        assert status_of(lambda: client.unload_model("alexnet", headers={"authorization": "Bearer wrong"})) == (
            "StatusCode.UNAUTHENTICATED"
        )
        assert client.is_model_ready("alexnet")
        client.unload_model("alexnet", headers=good)
        assert not client.is_model_ready("alexnet")
        assert status_of(lambda: client.load_model("alexnet")) == "StatusCode.UNAUTHENTICATED"
        client.load_model("alexnet", headers=good)
        # Inference, configuration and statistics stay open.
        assert client.infer("alexnet", [image_input(1)]).as_numpy("LOGITS").shape == (1, 1000)
        assert client.get_model_config("alexnet").config.name == "alexnet"
        assert client.get_inference_statistics("alexnet").model_stats[0].inference_count >= 1


@pytest.fixture
def store_with_head(tmp_path: Path) -> Path:
    """A model store holding an (untrained) three-class head on AlexNet, called ``pets``."""
    from service.finetune.heads import build_standardized_head
    from service.finetune.store import ModelStore
    from service.models import get_model_spec
    from vision_client.protocol import HeadConfig

    root = tmp_path / "seeded-store"
    store = ModelStore(root)
    spec = HeadConfig()
    head = build_standardized_head(spec, get_model_spec("alexnet").feature_dim, 3)
    store.save(
        name="pets", base_model="alexnet", head_spec=spec, head=head, labels=["cat", "dog", "fish"],
        loss="cross_entropy", metrics={}, job_id="seeded",
    )  # fmt: skip
    return root


def test_fine_tuned_models_unload_load_and_follow_their_base(serve_inprocess, store_with_head: Path) -> None:
    server = serve_inprocess(model_store=store_with_head)
    with triton.InferenceServerClient(server.target) as client:
        assert client.infer("pets", [image_input(1)]).as_numpy("LOGITS").shape == (1, 3)
        version = client.get_model_metadata("pets").versions[0]
        config = client.get_model_config("pets").config
        assert (config.platform, list(config.output[0].dims)) == ("vision_finetuned", [3])
        assert client.get_inference_statistics("pets").model_stats[0].version == version

        client.unload_model("pets")
        assert status_of(lambda: client.infer("pets", [image_input(1)])) == "StatusCode.UNAVAILABLE"
        assert client.is_model_ready("alexnet")
        client.load_model("pets")
        assert client.infer("pets", [image_input(1)]).as_numpy("LOGITS").shape == (1, 3)

        # The base model's backbone is shared: unloading it unloads the head on it too ...
        client.unload_model("alexnet")
        states = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
        assert states["pets"][0] == "UNAVAILABLE" and "'alexnet'" in states["pets"][1]
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("pets")
        refused = raised.value
        assert refused.status() == "StatusCode.UNAVAILABLE" and "load 'alexnet' first" in refused.message()
        # ... and loading the base model brings it back.
        client.load_model("alexnet")
        assert client.is_model_ready("pets")
        assert client.infer("pets", [image_input(1)]).as_numpy("LOGITS").shape == (1, 3)

        # An explicit load reads the store with the checks of a poll: a head that does not
        # fit its base model is refused, logged and counted, and the server goes on.
        from service.finetune.heads import build_standardized_head
        from service.finetune.store import ModelStore
        from vision_client.protocol import HeadConfig

        client.unload_model("pets")
        misfit = build_standardized_head(HeadConfig(), 2048, 3)  # ResNet101's features, not AlexNet's 9216
        ModelStore(store_with_head).save(
            name="pets", base_model="alexnet", head_spec=HeadConfig(), head=misfit, labels=["cat", "dog", "fish"],
            loss="cross_entropy", job_id="misfit",
        )  # fmt: skip
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("pets")
        assert raised.value.status() == "StatusCode.UNAVAILABLE" and "2048 features" in raised.value.message()
        assert sample_value(scrape(server.metrics_url), "vision_store_errors_total", reason="bad_dimensions") == 1
        assert not client.is_model_ready("pets") and client.is_model_ready("alexnet")
        # Deleted from the store while unloaded: there is nothing left to load.
        ModelStore(store_with_head).delete("pets")
        assert status_of(lambda: client.load_model("pets")) == "StatusCode.NOT_FOUND"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_unload_gives_the_memory_back_and_statistics_split_the_phases(serve_inprocess) -> None:
    server = serve_inprocess(device="cuda:0")
    device = torch.device("cuda", 0)
    backend = server.server.repository.get("alexnet").instances[0].backend  # PyTorch: auto's choice on CUDA
    modules = (backend.features, backend.classifier)
    parameters = sum(p.numel() * p.element_size() for module in modules for p in module.parameters())
    del backend, modules
    with triton.InferenceServerClient(server.target) as client:
        config = client.get_model_config("alexnet").config
        assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [
            (triton_config.ModelInstanceGroup.KIND_GPU, [0])
        ]
        client.infer("alexnet", [pixels_input(4)])
        infer = client.get_inference_statistics("alexnet").model_stats[0].inference_stats
        assert min(infer.compute_input.ns, infer.compute_infer.ns, infer.compute_output.ns) > 0

        loaded = torch.cuda.memory_allocated(device)
        client.unload_model("alexnet")
        gc.collect()
        unloaded = torch.cuda.memory_allocated(device)
        assert loaded - unloaded >= 0.9 * parameters, (loaded, unloaded, parameters)
        client.load_model("alexnet")
        assert torch.cuda.memory_allocated(device) - unloaded >= 0.9 * parameters
        assert client.infer("alexnet", [pixels_input(1)]).as_numpy("LOGITS").shape == (1, 1000)
