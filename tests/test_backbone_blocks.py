"""Part of the backbone trained (``train_backbone_blocks``): each model's blocks, a config's k checked
before any image, the activations at the cut computed once, the blocks trained at their own rate,
and the whole new network stored as data, served through a runtime with the torch module's logits,
on a second replica and after a restart.

The servers are in-process servers of the tiny network (two blocks: ``conv``, ``fc``) with seeded
random weights; the reference is the network rebuilt here by torch from the same seeded weights
and the stored blocks and head.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format

from service.config import FineTuneLimits, RuntimeConfig
from service.errors import InvalidInputError, StoreEntryError
from service.finetune.backbone import (
    MAX_ACTIVATION_BYTES,
    FineTunedNetwork,
    check_backbone,
    max_examples_at_cut,
    whole_network,
)
from service.finetune.heads import TrainedPart, build_trained_part
from service.finetune.spec import check_limits, max_examples
from service.finetune.store import MANIFEST, TRAINED_BLOCKS_FORMAT, ModelStore
from service.finetune.trainer import _optimizer, train_head
from service.models import WeightsSource, build_model, get_model_spec, list_models
from service.models.blocks import Backbone, cut_shape, split_at
from tests.conftest import session_runtime_cache
from tests.store_util import manifest_of, save_head, write_manifest
from tests.test_head_layers import _post_config_then_wait, assert_close, nothing_written, pixels, served_logits
from tests.test_orphans import examples, no_tracebacks, poll, ready
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client import AugmentationConfig, Client, FineTuneConfig, HeadConfig
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol.fine_tuning import from_dict, from_message, to_dict, to_message
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

LIMITS = FineTuneLimits()


# -- the blocks of each model --------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_the_blocks_in_order_are_the_backbone_at_every_cut(name: str) -> None:
    """Every split, prefix then trained part, computes the backbone's features exactly (on the
    smallest input each network takes: the split does not depend on the size)."""
    spec = get_model_spec(name)
    torch.manual_seed(0)
    net = spec.builder(weights=None).eval()  # torchvision's own initialization: any weights will do
    assert spec.blocks is not None and len(spec.blocks(net)[1]) == len(spec.block_names)
    side = 64 if name == TINY else max(32, *spec.min_size)
    batch = torch.from_numpy(pixels(2, seed=4)[:, :, :side, :side].copy())
    with torch.inference_mode():
        expected = spec.features(net)(batch)
        assert expected.shape[1] == spec.feature_dim
        for trained in range(1, len(spec.block_names) + 1):
            prefix, part = split_at(spec, net, trained)
            assert torch.equal(part(prefix(batch)), expected), (name, trained)


def test_the_trained_blocks_are_the_last_ones_directly_below_the_head() -> None:
    assert get_model_spec("alexnet").block_names[-2:] == ("fc6", "fc7")
    assert get_model_spec("vgg16").block_names[:5] == tuple(f"stage{i}" for i in range(1, 6))
    assert get_model_spec("resnet101").block_names == ("layer1", "layer2", "layer3", "layer4")
    assert cut_shape(get_model_spec("alexnet"), 1) == (4096,)  # fc7 takes fc6's output
    assert cut_shape(get_model_spec("resnet101"), 1) == (1024, 14, 14)  # layer4 takes layer3's


# -- hostile values of k and of its learning rate --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "train_backbone_blocks must be an integer from 0"),
        (1.5, "train_backbone_blocks must be an integer from 0"),
        ("1", "train_backbone_blocks must be an integer from 0"),
        (True, "train_backbone_blocks must be an integer from 0"),
        (2**31, "train_backbone_blocks must be an integer from 0"),
    ],
)
def test_a_k_that_is_not_a_count_of_blocks_is_refused_where_the_config_is_made(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FineTuneConfig(TINY, "k", train_backbone_blocks=value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):  # JSON (job records) goes through the same check
        from_dict({**to_dict(FineTuneConfig(TINY, "k")), "train_backbone_blocks": value})


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf"), 1e60])
def test_a_blocks_lr_factor_that_is_not_a_positive_number_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="backbone_lr_factor"):
        FineTuneConfig(TINY, "k", backbone_lr_factor=value)


def test_k_and_its_factor_travel_on_the_wire_and_in_json() -> None:
    config = FineTuneConfig(TINY, "k", train_backbone_blocks=2, backbone_lr_factor=0.5)
    sent = from_message(to_message(config))  # (float32 on the wire: 0.5 is exact)
    assert (sent.train_backbone_blocks, sent.backbone_lr_factor) == (2, 0.5)
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config
    unset = from_message(pb.FineTuneConfig(base_model=TINY, output_model="k"))  # proto3's zero: the defaults
    assert (unset.train_backbone_blocks, round(unset.backbone_lr_factor, 6)) == (0, 0.01)
    older = to_dict(FineTuneConfig(TINY, "k"))
    del older["train_backbone_blocks"], older["backbone_lr_factor"]  # a record of a server of before
    assert from_dict(older).train_backbone_blocks == 0
    with pytest.raises(ConfigError, match="train_backbone_blocks must be an integer from 0"):
        from_message(pb.FineTuneConfig(base_model=TINY, output_model="k", train_backbone_blocks=-3))


@pytest.mark.parametrize(
    ("base", "blocks", "message"),
    [
        (TINY, 3, "train_backbone_blocks 3: tiny's backbone has 2 blocks (conv, fc, first to last); choose 0"),
        ("alexnet", 8, "alexnet's backbone has 7 blocks (conv1, conv2, conv3, conv4, conv5, fc6, fc7"),
        ("resnet101", 2**31 - 1, "resnet101's backbone has 4 blocks (layer1, layer2, layer3, layer4"),
    ],
)
def test_k_beyond_the_base_models_blocks_is_refused_by_the_servers_check(base: str, blocks: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_limits(FineTuneConfig(base, "k", train_backbone_blocks=blocks), LIMITS)


def test_a_blocks_learning_rate_past_the_servers_bound_is_refused() -> None:
    config = FineTuneConfig(TINY, "k", train_backbone_blocks=1, backbone_lr_factor=1e5)
    with pytest.raises(InvalidInputError, match="lower backbone_lr_factor"):
        check_backbone(config)
    check_backbone(FineTuneConfig(TINY, "k", backbone_lr_factor=1e5))  # no blocks trained: the factor is unused


def test_the_activations_kept_bound_the_examples_of_a_job() -> None:
    resnet = FineTuneConfig("resnet101", "k", train_backbone_blocks=1)
    per_image = 1024 * 14 * 14 * 2  # float16
    assert max_examples_at_cut(resnet) == MAX_ACTIVATION_BYTES // per_image
    assert max_examples(resnet, LIMITS) == MAX_ACTIVATION_BYTES // per_image < LIMITS.max_examples
    viewed = FineTuneConfig("resnet101", "k", train_backbone_blocks=1, augmentation=AugmentationConfig(2))
    assert max_examples(viewed, LIMITS) == MAX_ACTIVATION_BYTES // (3 * per_image)
    assert max_examples(FineTuneConfig("alexnet", "k", train_backbone_blocks=1), LIMITS) == LIMITS.max_examples
    assert max_examples_at_cut(FineTuneConfig("alexnet", "k")) is None


# -- training the blocks ------------------------------------------------------------------------------


def test_the_blocks_train_at_their_own_rate_from_a_copy_and_the_head_on_their_output() -> None:
    spec = get_model_spec(TINY)
    net = build_model(spec, WeightsSource.parse("random"))
    prefix, blocks = split_at(spec, net, 1)
    images = torch.from_numpy(pixels(24, seed=2))
    targets = torch.tensor([i % 2 for i in range(24)])
    images[targets == 1] += 0.5  # brighter: a class the conv's ReLU output can tell
    with torch.inference_mode():
        activations = prefix(images).clone()
    before = {key: value.clone() for key, value in blocks.state_dict().items()}
    config = FineTuneConfig(TINY, "k", train_backbone_blocks=1, backbone_lr_factor=0.25, epochs=3, batch_size=8)
    result = train_head(activations, targets, config, num_outputs=2, trunk=blocks)
    part = result.head
    assert isinstance(part, TrainedPart) and not part.training
    assert all(torch.equal(before[k], v) for k, v in blocks.state_dict().items())  # the blocks given stay
    trained = part.blocks.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # the copy trained
    groups = _optimizer(config, part).param_groups
    assert [group["lr"] for group in groups] == [pytest.approx(1e-3), pytest.approx(2.5e-4)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in part.blocks.parameters()}
    with torch.inference_mode():  # the part is its blocks, then its head alone
        assert torch.equal(part(activations), part.top()(part.blocks(activations)))


def test_the_blocks_normalizations_train_on_batches_and_serve_statistics_measured_on_the_training_examples() -> None:
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
    activations = torch.randn(201, 8) * 1e4 + 5e3  # far off what a normalization starts from (mean 0, variance 1)
    targets = (activations[:, 0] > 5e3).long()
    config = FineTuneConfig(  # batches of 25 and a last one of a single row: 201 = 8 x 25 + 1
        TINY, "k", train_backbone_blocks=1, backbone_lr_factor=1.0, epochs=30, batch_size=25, validation_fraction=0.0
    )
    part = train_head(activations, targets, config, num_outputs=2, trunk=blocks).head
    assert isinstance(part, TrainedPart)
    trained, norm = part.blocks[0], part.blocks[1]
    assert not torch.equal(trained.weight, blocks[0].weight)  # the blocks trained
    # The statistics served are those of every training example through the blocks as trained, measured
    # once after the last epoch (one part of at most 256 rows), not averages the steps left behind.
    with torch.inference_mode():
        outputs = trained(activations)
    assert int(norm.num_batches_tracked) == 1
    assert torch.allclose(norm.running_mean, outputs.mean(0), rtol=1e-4, atol=1e-2)
    assert torch.allclose(norm.running_var, outputs.var(0), rtol=1e-3)
    assert torch.equal(blocks[1].running_mean, torch.zeros(16)) and int(blocks[1].num_batches_tracked) == 0
    with torch.inference_mode():
        accuracy = float((part(activations).argmax(1) == targets).float().mean())
    assert accuracy > 0.9, accuracy


def test_a_batch_of_one_row_trains_the_blocks_on_their_measured_statistics() -> None:
    """Batches of one: no batch statistics to normalize by; each step uses the measured ones."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
    activations = torch.randn(40, 8)
    targets = (activations[:, 0] > 0).long()
    config = FineTuneConfig(TINY, "k", train_backbone_blocks=1, epochs=2, batch_size=1, validation_fraction=0.0)
    part = train_head(activations, targets, config, num_outputs=2, trunk=blocks).head
    assert isinstance(part, TrainedPart) and not torch.equal(part.blocks[0].weight, blocks[0].weight)


# -- a job over the wire: refused before any image, or trained, published, served, restarted --------


def hostile_config(**fields: object) -> pb.FineTuneConfig:
    return pb.FineTuneConfig(base_model=TINY, output_model="hostile", epochs=1, **fields)  # type: ignore[arg-type]


HOSTILE = {
    "k beyond the blocks": (hostile_config(train_backbone_blocks=3), "tiny's backbone has 2 blocks"),
    "a negative k": (hostile_config(train_backbone_blocks=-1), "train_backbone_blocks must be an integer from 0"),
    "an lr factor too large": (
        hostile_config(train_backbone_blocks=1, backbone_lr_factor=1e6),
        "lower backbone_lr_factor",
    ),
    "a negative lr factor": (hostile_config(backbone_lr_factor=-1.0), "backbone_lr_factor must be a positive"),
}


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory) -> Iterator:
    from tests.inprocess import InProcessServer, tiny_config

    store = tmp_path_factory.mktemp("blocks-hostile") / "store"
    with InProcessServer(tiny_config(store, store_poll_seconds=3600)) as server:
        yield server, store


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_k_is_invalid_argument_over_grpc_before_any_image(hostile_server, case: str, caplog) -> None:
    server, store = hostile_server
    config, expected = HOSTILE[case]
    sent_example = threading.Event()
    release = threading.Event()

    def requests():
        yield pb.CreateJobRequest(config=config)
        release.wait(60)  # set once the call has its answer: the examples come only after it
        sent_example.set()
        image, label = examples(1)[0]
        yield pb.CreateJobRequest(examples=pb.ExampleBatch(examples=[pb.Example(image=image, label=label)]))

    with grpc.insecure_channel(server.target) as channel:
        try:
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.FineTuningStub(channel).CreateJob(requests(), timeout=60)
            sent_before_the_answer = sent_example.is_set()
        finally:
            release.set()
    assert not sent_before_the_answer
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert expected in error.value.details(), error.value.details()
    nothing_written(store)
    no_tracebacks(caplog)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", "tiny's backbone has 2 blocks"), ("1.5", "not a FineTuneConfig in JSON"), ('"x"', "not a FineTuneConfig")],
)
def test_a_hostile_k_is_invalid_argument_over_rest_before_any_image(
    hostile_server, value: str, expected: str, caplog
) -> None:
    import asyncio

    server, store = hostile_server
    config = json_format.MessageToDict(hostile_config())
    text = json.dumps(config)[:-1] + f', "trainBackboneBlocks": {value}}}'
    status, answer = asyncio.run(_post_config_then_wait(server.http_url, text))
    assert status == 400, (status, answer)
    assert expected in answer["error"], answer
    nothing_written(store)
    no_tracebacks(caplog)


@pytest.fixture
def onnx_server(serve_inprocess):
    def start(store: object):
        return serve_inprocess(
            models=(TINY,),
            weights="random",
            runtime=RuntimeConfig(name="onnxruntime", cache_dir=session_runtime_cache()),
            model_store=store,
            store_poll_seconds=3600,  # the test runs the polls
        )

    return start


def reference_network(store: object, name: str) -> FineTunedNetwork:
    """The whole network as torch builds it here: tiny's seeded weights, the stored blocks and head."""
    manifest, part = ModelStore(store).load(name)  # type: ignore[arg-type]  # a directory or an S3Location
    assert isinstance(part, TrainedPart) and manifest.train_backbone_blocks == 1
    spec = get_model_spec(TINY)
    _, net = whole_network(name, TINY, build_model(spec, WeightsSource.parse("random")), part)
    return net


def torch_logits(net: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(batch)).numpy()


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_a_job_training_the_last_block_publishes_the_whole_network_served_by_onnxruntime(
    kind: str, onnx_server, tmp_path: Path, request, caplog
) -> None:
    store = tmp_path / "shared" if kind == "directory" else request.getfixturevalue("s3_store")
    first, second = onnx_server(store), onnx_server(store)
    config = FineTuneConfig(
        TINY, "deeper", train_backbone_blocks=1, epochs=3, batch_size=4, seed=5, augmentation=AugmentationConfig(1)
    )  # one augmented view: its activations through the same internal model, as PIXELS
    with Client(first.target) as sdk:
        job = sdk.fine_tune(config, examples(16), timeout=180)
        assert job.state == "succeeded", job.error
        models = {model.name: model for model in sdk.models()}
    assert models["deeper"].runtime == "onnxruntime"
    objects = ModelStore(store).objects
    written = json.loads(objects.read(f"deeper/{MANIFEST}", 1 << 20))
    assert (written["format_version"], written["train_backbone_blocks"]) == (TRAINED_BLOCKS_FORMAT, 1)
    files = {info.key.rsplit("/", 1)[-1] for info in objects.list("deeper/")}
    assert {file.rsplit(".", 1)[-1] for file in files} == {"json", "safetensors"}, files  # never a pickle
    net = reference_network(store, "deeper")
    assert isinstance(net.features, torch.nn.Sequential) and isinstance(net.features[1], Backbone)
    batch = pixels(4, seed=7)
    expected = torch_logits(net, batch)
    assert_close(served_logits(first, "deeper", batch), expected)
    poll(second)  # a second replica on the same store
    assert ready(second, "deeper")
    assert_close(served_logits(second, "deeper", batch), expected)
    exported = [entry for entry in session_runtime_cache().glob("deeper/*") if (entry / "entry.json").is_file()]
    assert exported, "the whole network is exported into the runtime cache under its name, keyed by its weights"
    first.stop()
    second.stop()
    again = onnx_server(store)  # a restart on the same store
    assert ready(again, "deeper")
    assert_close(served_logits(again, "deeper", batch), expected)
    no_tracebacks(caplog)


def test_a_store_poll_leaves_a_network_its_own_job_is_publishing_to_the_job(serve_inprocess, tmp_path, caplog) -> None:
    """The poll that reads the manifest a job of the same server has just written, while the job
    exports and starts the network, builds nothing: the network is exported and built once."""
    caplog.set_level(logging.INFO, logger="service.runtimes.export")
    server = serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="onnxruntime", cache_dir=session_runtime_cache()),
        model_store=tmp_path / "polled-store",
        store_poll_seconds=0.02,  # many passes while the job publishes
    )
    name = f"polled-{uuid.uuid4().hex[:8]}"  # the cache keeps exports under the model's name: none yet
    with Client(server.target) as sdk:
        config = FineTuneConfig(TINY, name, train_backbone_blocks=1, epochs=1, batch_size=4, seed=7)
        job = sdk.fine_tune(config, examples(8), timeout=180)
        assert job.state == "succeeded", job.error
    assert ready(server, name)
    built = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{name}: ")]
    assert len(built) == 1 and "exported to ONNX" in built[0], built  # by the job; the polls found it served
    no_tracebacks(caplog)


def test_a_network_with_a_trained_block_served_by_openvino_has_the_torch_modules_logits(
    serve_inprocess, tmp_path: Path, caplog
) -> None:
    """The same whole network under ``--runtime openvino`` (its export compiled by OpenVINO, in
    float32): logits within the same relative 1e-4 of the torch module's as under ONNX Runtime."""
    store = tmp_path / "store"
    save_trained(store, "deeper", seed=3)
    server = serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="openvino", cache_dir=session_runtime_cache()),
        model_store=store,
        store_poll_seconds=3600,
    )
    assert ready(server, "deeper")
    with Client(server.target) as sdk:
        assert {model.name: model.runtime for model in sdk.models()}["deeper"] == "openvino"
    batch = pixels(4, seed=8)
    assert_close(served_logits(server, "deeper", batch), torch_logits(reference_network(store, "deeper"), batch))
    no_tracebacks(caplog)


# -- the store: trained blocks as data, checked as they are read ------------------------------------


def save_trained(store: Path, name: str, *, seed: int = 0) -> TrainedPart:
    """A tiny model with its last block trained (random values), saved as ``name``."""
    torch.manual_seed(seed)
    part = build_trained_part(TINY, 1, HeadConfig(), TINY_FEATURE_DIM, 3)
    with torch.no_grad():
        for tensor in part.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
        part.std.abs_().add_(0.5)
    ModelStore(store).save(
        name=name, base_model=TINY, head_spec=HeadConfig(), head=part, labels=["a", "b", "c"],
        loss="cross_entropy", job_id="test",
    )  # fmt: skip
    return part


def test_trained_blocks_round_trip_the_store_and_a_frozen_head_is_written_as_before(tmp_path: Path) -> None:
    store = tmp_path / "store"
    part = save_trained(store, "deep")
    manifest, loaded = ModelStore(store).load("deep")
    assert manifest.train_backbone_blocks == 1 and isinstance(loaded, TrainedPart)
    assert all(torch.equal(part.state_dict()[k], v) for k, v in loaded.state_dict().items())
    assert any(key.startswith("blocks.") for key in loaded.state_dict())
    save_head(store, "flat", base=TINY, features=TINY_FEATURE_DIM)
    flat = manifest_of(store, "flat")
    assert flat["format_version"] == 1 and "train_backbone_blocks" not in flat  # as servers of before wrote it
    assert not isinstance(ModelStore(store).load("flat")[1], TrainedPart)


@pytest.mark.parametrize(
    ("change", "reason", "message"),
    [
        ({"format_version": 1}, "bad_manifest", "train_backbone_blocks 1 must be 1 to 64 with format_version 2"),
        (
            {"train_backbone_blocks": None},
            "bad_manifest",
            "train_backbone_blocks 0 must be 1 to 64 with format_version 2",
        ),
        ({"train_backbone_blocks": 3}, "bad_dimensions", "tiny's backbone has 2 blocks"),
        ({"train_backbone_blocks": 2}, "bad_weights", "weights do not fit"),  # the file holds one block
        ({"train_backbone_blocks": -1}, "bad_manifest", "must be 1 to 64"),
        ({"train_backbone_blocks": 1.5}, "bad_manifest", "train_backbone_blocks must be a int"),
        ({"base_model": "elsewhere"}, "base_not_served", "unknown to this server"),
    ],
)
def test_a_manifest_with_hostile_trained_blocks_is_refused_with_its_reason(
    tmp_path: Path, change: dict[str, object], reason: str, message: str
) -> None:
    store = tmp_path / "store"
    save_trained(store, "deep")
    data = manifest_of(store, "deep")
    for key, value in change.items():  # None: the field left out
        if value is None:
            del data[key]
        else:
            data[key] = value
    write_manifest(store, "deep", data)
    with pytest.raises(StoreEntryError) as error:
        ModelStore(store).load("deep")
    assert error.value.reason == reason, error.value
    assert message in str(error.value), error.value
