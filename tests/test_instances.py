"""Several model instances per device (``--instances``): real servers, real tritonclient."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2 as triton_config

from service.config import BatchingConfig, RuntimeConfig
from service.engine.batching import BatchQueue, WorkItem
from service.engine.runtime import ModelInstance
from service.host.cpus import usable_cores
from service.options import build_serve_parser
from tests.conftest import session_runtime_cache
from tests.metrics_util import sample_value, scrape


def pixels_input(seed: int) -> triton.InferInput:
    values = np.random.default_rng(seed).standard_normal((1, 3, 224, 224), dtype=np.float32)
    tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    return tensor


def infer_threads(model: str) -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(f"infer-{model}-"))


def torch_threads_of_a_worker(queue: BatchQueue) -> int:
    """torch's intra-op threads in the thread that runs ``queue``'s batches: one more work item,
    answered there."""
    seen: list[int] = []
    answered = threading.Event()

    def on_result(result: object) -> None:
        seen.append(torch.get_num_threads())
        answered.set()

    queue.put([WorkItem(pixels=torch.zeros((1, 3, 224, 224)), on_result=on_result)])
    assert answered.wait(60)
    return seen[0]


def test_instances_share_the_clients_and_answer_as_one(serve_inprocess) -> None:
    """32 clients at once, two instances: no batch takes more than half of them, and every answer
    is the one a lone request gets."""
    server = serve_inprocess(
        device="cpu",
        runtime=RuntimeConfig(cache_dir=session_runtime_cache(), instances=2),
        batching=BatchingConfig(max_batch_size=32),
    )
    instances = server.server.repository.get("alexnet").instances
    assert len(instances) == 2
    assert infer_threads("alexnet") == ["infer-alexnet-cpu-0", "infer-alexnet-cpu-1"]
    with triton.InferenceServerClient(server.target) as client:
        config = client.get_model_config("alexnet").config
        assert [(g.kind, g.count) for g in config.instance_group] == [(triton_config.ModelInstanceGroup.KIND_CPU, 2)]
        alone = [client.infer("alexnet", [pixels_input(seed)]).as_numpy("LOGITS") for seed in range(32)]

    def call(seed: int) -> np.ndarray:
        with triton.InferenceServerClient(server.target) as own:
            return own.infer("alexnet", [pixels_input(seed)]).as_numpy("LOGITS")

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(call, range(32)))
    for one, other in zip(alone, together, strict=True):
        np.testing.assert_allclose(one, other, rtol=1e-4, atol=1e-4)
    text = scrape(server.metrics_url)
    batches = sample_value(text, "vision_batches_total", model="alexnet", device="cpu")
    at_most_16 = sample_value(text, "vision_batch_size_bucket", model="alexnet", device="cpu", le="16.0")
    assert at_most_16 == batches  # a batch takes at most half of the 32 requests the queue knows of


def threads_of_passes(instance: ModelInstance, batch: list[torch.Tensor]) -> list[int]:
    """torch's count in a fresh thread after a lone pass, then after an ordinary one."""
    seen: list[int] = []

    def run() -> None:
        instance.forward(batch, alone=True)
        seen.append(torch.get_num_threads())
        instance.forward(batch, alone=False)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen


@pytest.mark.skipif(usable_cores() < 2, reason="on one core no batch gets more threads than another")
@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_a_lone_batch_runs_on_every_core_and_agrees(serve_inprocess, runtime: str) -> None:
    """Instances that divided the cores share one backend on all of them for batches that run
    while no other instance computes (torch: the same module, on more threads); both give the
    same logits, and small AlexNet loads stay whole for it."""
    server = serve_inprocess(
        device="cpu", runtime=RuntimeConfig(name=runtime, cache_dir=session_runtime_cache(), instances=2)
    )
    first, second = server.server.repository.get("alexnet").instances
    cores = usable_cores()
    assert first.backend.threads == second.backend.threads == max(1, cores // 2)
    assert first.lone is not None and first.lone.threads == cores
    assert server.server.repository.get("alexnet").queue.min_split_images == 9  # small loads run there whole
    batch = [torch.from_numpy(np.random.default_rng(1).standard_normal((3, 3, 224, 224), dtype=np.float32))]
    np.testing.assert_allclose(
        first.forward(batch, alone=True), second.forward(batch, alone=False), rtol=1e-4, atol=1e-4
    )
    features = first.features()  # what fine-tuning extracts, and fine-tuned heads run on
    assert features.lone is not None
    np.testing.assert_allclose(
        features.forward(batch, alone=True), features.forward(batch, alone=False), rtol=1e-4, atol=1e-4
    )
    if runtime == "torch":
        assert threads_of_passes(first, batch) == [cores, max(1, cores // 2)]


def test_one_instance_has_no_lone_backend(serve_inprocess) -> None:
    server = serve_inprocess(device="cpu")
    (instance,) = server.server.repository.get("alexnet").instances
    assert instance.lone is None
    assert server.server.repository.get("alexnet").queue.min_split_images == 1


@pytest.mark.skipif(usable_cores() < 2, reason="on one core every thread runs torch on one")
def test_a_torch_model_started_after_decoding_began_runs_on_every_core(serve_inprocess, photos) -> None:
    """Decode threads run torch on one thread each, and torch.set_num_threads also sets the count
    that threads started later read: a torch model (re)loaded once images had been decoded ran its
    forward passes on one core. Each worker sets its own."""
    server = serve_inprocess(device="cpu", runtime=RuntimeConfig(name="torch"))
    image = triton.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([next(iter(photos.values()))], dtype=np.object_))
    with triton.InferenceServerClient(server.target) as client:
        client.infer("alexnet", [image])  # a decode thread starts
        client.unload_model("alexnet")
        client.load_model("alexnet")
    assert torch_threads_of_a_worker(server.server.repository.get("alexnet").queue) == usable_cores()


def test_instances_divide_the_cores_unless_told_their_threads(serve_inprocess) -> None:
    """With --runtime-threads 0 two instances split the cores; a thread count given is each one's."""
    cores = usable_cores()
    assert RuntimeConfig(instances=2).instance_threads == max(1, cores // 2)
    assert RuntimeConfig(instances=1).instance_threads == cores
    assert RuntimeConfig(instances=3, threads=2).instance_threads == 2
    assert RuntimeConfig().lone_threads is None
    assert RuntimeConfig(instances=2, threads=1).lone_threads is None
    server = serve_inprocess(
        device="cpu", runtime=RuntimeConfig(cache_dir=session_runtime_cache(), instances=2, threads=2)
    )
    first, second = server.server.repository.get("alexnet").instances
    assert first.backend.threads == second.backend.threads == 2
    assert first.lone is None  # the threads given are each instance's: no batch is special
    assert server.server.repository.get("alexnet").queue.min_split_images == 1
    with triton.InferenceServerClient(server.target) as client:
        assert client.infer("alexnet", [pixels_input(0)]).as_numpy("LOGITS").shape == (1, 1000)


@pytest.mark.parametrize("value", ["0", "65", "two", "-1"])
def test_an_instance_count_out_of_range_is_refused(value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_serve_parser({}).parse_args(["--instances", value])
    assert "--instances" in capsys.readouterr().err


@pytest.mark.skipif(usable_cores() < 2, reason="on one core no batch gets more threads than another")
def test_unload_stops_every_instance_and_frees_the_lone_session(serve_inprocess) -> None:
    server = serve_inprocess(device="cpu", runtime=RuntimeConfig(cache_dir=session_runtime_cache(), instances=2))
    first = server.server.repository.get("alexnet").instances[0]
    assert first.lone is not None
    lone = weakref.ref(first.lone)
    del first
    with triton.InferenceServerClient(server.target) as client:
        client.unload_model("alexnet")
        gc.collect()
        assert infer_threads("alexnet") == []
        assert lone() is None, "the unloaded model's lone-batch session is still referenced"
        client.load_model("alexnet")
        assert infer_threads("alexnet") == ["infer-alexnet-cpu-0", "infer-alexnet-cpu-1"]
        assert client.infer("alexnet", [pixels_input(0)]).as_numpy("LOGITS").shape == (1, 1000)
