"""Heads as layer lists: one vocabulary (vision_client.protocol), checked before any image, stored
as data and rebuilt from our own modules; the presets are layer lists; stores of before still load.

The servers are in-process servers of the tiny network (tests/tiny.py) on a directory store and on
moto's S3; the served logits are compared with the head rebuilt from the store by torch, on the
backbone's features computed here from the same seeded weights.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from google.protobuf import json_format
from PIL import Image
from torch import nn

from service.config import FineTuneLimits, RuntimeConfig
from service.errors import InvalidInputError
from service.finetune.heads import StandardizedHead, build_head
from service.finetune.spec import MAX_HEAD_LAYERS, check_head, check_limits, head_parameters
from service.finetune.store import MANIFEST, ModelStore
from service.finetune.trainer import train_head
from service.models import WeightsSource, build_model, get_model_spec, list_models
from tests.conftest import session_runtime_cache
from tests.test_console import browser, console_server, screenshots  # noqa: F401  (fixtures of the console's tests)
from tests.test_orphans import examples, no_tracebacks, poll, ready
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client import Client, FineTuneConfig, HeadConfig, Layer
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol import format_layers, parse_layers, vocabulary
from vision_client.protocol.fine_tuning import from_dict, from_message, to_dict, to_message
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

LIMITS = FineTuneLimits()
# 43 layers: every kind, a parallel block of three branches (one nested, one summed), dropout at several places.
LONG = HeadConfig(
    layers=parse_layers(
        ",".join(["linear:16,batch_norm,gelu,dropout:0.125,linear:12,layer_norm,relu"] * 4)
        + ",parallel(linear:8,relu|linear:16,gelu,linear:8|parallel:sum(linear:8|linear:8,layer_norm)),relu"
        + ",linear:10,batch_norm,relu,dropout:0.25,linear:6"
    )
)
HEADS = {
    "linear": HeadConfig(),
    "two_layer": HeadConfig("two_layer", hidden=8, dropout=0.25),
    "parallel": HeadConfig("parallel", hidden=8, blocks=3),
    "long": LONG,
}


def stored_values(head: HeadConfig, inputs: int, outputs: int) -> int:
    return sum(t.numel() for t in build_head(head, inputs, outputs).state_dict().values())


# -- the vocabulary, without a server ---------------------------------------------------------------


def test_the_long_list_is_long_and_uses_every_layer_kind() -> None:
    from vision_client.protocol.fine_tuning import count_layers

    assert 40 <= count_layers(LONG.layers) <= MAX_HEAD_LAYERS
    kinds = {layer.kind for layer in LONG.layers}
    assert kinds == set(vocabulary()["layers"]), kinds


@pytest.mark.parametrize("name", HEADS)
def test_a_head_round_trips_through_the_wire_json_and_text(name: str) -> None:
    config = FineTuneConfig(TINY, "rt", head=HEADS[name])
    assert from_message(to_message(config)).head == config.head
    assert from_dict(json.loads(json.dumps(to_dict(config)))).head == config.head
    if config.head.kind == "custom":
        assert parse_layers(format_layers(config.head.layers)) == config.head.layers
        assert HeadConfig(layers=parse_layers(json.dumps(to_dict(config)["head"]["layers"]))) == config.head


@pytest.mark.parametrize("name", HEADS)
def test_parameters_are_counted_from_the_list_as_the_built_head_stores_them(name: str) -> None:
    head = HEADS[name]
    assert head_parameters(head, 20, 3) == stored_values(head, 20, 3)


def test_presets_are_layer_lists() -> None:
    assert HeadConfig().layer_list() == ()
    assert format_layers(HeadConfig("two_layer", hidden=7, dropout=0.5).layer_list()) == "dropout:0.5,linear:7,relu"
    assert format_layers(HeadConfig("parallel", hidden=4, blocks=2).layer_list()) == (
        "parallel(linear:4|linear:4),relu,parallel(linear:4|linear:4),relu"
    )
    two_layer = [type(m) for m in build_head(HeadConfig("two_layer", hidden=5), 3, 2)]
    assert two_layer == [nn.Linear, nn.ReLU, nn.Linear]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Layer("dropout", p=1.0), r"dropout p must be in \[0, 1\), got 1.0"),
        (lambda: Layer("dropout", p=-0.1), r"dropout p must be in \[0, 1\)"),
        (lambda: Layer("conv2d"), "layer kind 'conv2d' is unknown; choose one of linear, relu"),
        (lambda: Layer("linear", width=0), "linear width must be a positive integer"),
        (lambda: Layer("linear", width=2**31), "linear width must be a positive integer"),
        (lambda: Layer("relu", width=3), "a relu layer takes no width"),
        (lambda: Layer("linear", width=3, p=0.5), "a linear layer takes no p"),
        (lambda: Layer("parallel", branches=[[Layer("relu")]]), "two or more branches"),
        (lambda: Layer("parallel", branches=[[Layer("relu")], []]), "parallel branch 1 is empty"),
        (lambda: HeadConfig("two_layer", layers=[Layer("relu")]), "is a preset and takes no layers"),
        (lambda: HeadConfig("custom"), "a custom head needs its layers"),
        (lambda: HeadConfig(layers=["relu"]), r"head layers\[0\] must be a Layer"),
        (lambda: HeadConfig(layers=[Layer("relu")] * 10_000), "a head has at most 256 layers"),
        (lambda: parse_layers(json.dumps([{"kind": "relu"}] * 10_000)), "a head has at most 256 layers"),
        (lambda: parse_layers("linear:64,softmax"), "layer kind 'softmax' is unknown"),
        (lambda: parse_layers("parallel(linear:4|linear:4"), "expected '|' or '\\)'"),
        (lambda: parse_layers("(" * 20), "expected a layer"),
        (lambda: parse_layers("parallel(" * 12 + "relu|relu" + ")" * 12), "nest at most 8 deep"),
    ],
)
def test_a_bad_layer_is_refused_where_the_config_is_made(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_a_wire_message_names_the_bad_layer() -> None:
    message = to_message(FineTuneConfig(TINY, "x", head=LONG))
    message.head.layers[4].branches.add().layers.add(kind="relu")  # a branch where a linear has none
    with pytest.raises(ConfigError, match=r"head layers\[4\]: a linear layer takes no branches"):
        from_message(message)
    message = to_message(FineTuneConfig(TINY, "x", head=LONG))
    message.head.layers[28].branches[2].layers[0].branches[1].layers[1].p = 1.5
    with pytest.raises(ConfigError) as error:
        from_message(message)
    assert (
        error.value.message == "head layers[28].branches[2][0].branches[1][1]: a layer_norm layer takes no p "
        "(only dropout does), got 1.5"
    )


@pytest.mark.parametrize(
    "head, message",
    [
        (HeadConfig(layers=[Layer("relu")] * 100), f"at most {MAX_HEAD_LAYERS} layers on this server.*got 100"),
        (
            HeadConfig(layers=[Layer("linear", width=2**31 - 1)]),
            r"head layers\[0\] \(linear\): width must be at most 8192",
        ),
        (
            HeadConfig(layers=[Layer("linear", width=8192), Layer("linear", width=8192)]),
            "a head of 2 layers on 16 features and 2 outputs has 67,272,706 parameters, over the limit of 50,000,000",
        ),
        (
            HeadConfig(layers=[Layer("parallel", branches=[[Layer("linear", width=4)], [Layer("linear", width=5)]])]),
            r"head layers\[0\] \(parallel\): its branches end in widths 4, 5",
        ),
        (
            HeadConfig(layers=[Layer("parallel", branches=[[Layer("linear", width=9000)], [Layer("relu")]])]),
            r"head layers\[0\]\.branches\[0\]\[0\] \(linear\): width must be at most 8192",
        ),
    ],
)
def test_a_head_beyond_the_servers_limits_is_refused_before_it_is_built(head: HeadConfig, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        check_head(head, TINY_FEATURE_DIM, 2, LIMITS)
    if "parameters" not in message and "widths" not in message:  # the config alone shows these
        with pytest.raises(InvalidInputError, match=message):
            check_limits(FineTuneConfig(TINY, "x", head=head), LIMITS)


def test_batch_norm_trains_on_a_last_batch_of_one_and_serves_its_running_statistics() -> None:
    head = HeadConfig(layers=parse_layers("linear:8,batch_norm,relu"))
    features, labels = torch.randn(9, 4), torch.tensor([0, 1, 2] * 3)
    config = FineTuneConfig(TINY, "bn", head=head, epochs=3, batch_size=4, validation_fraction=0.0)
    result = train_head(features, labels, config, num_outputs=3)  # 9 = 4 + 4 + 1 a epoch
    trained = result.head
    # each epoch counted its two full batches; its batch of one took the running statistics instead
    assert trained.head[1].num_batches_tracked.item() == 2 * result.metrics.best_epoch
    assert not trained.training
    single = trained(features[:1])
    assert torch.allclose(single, trained(features)[:1], atol=1e-6)  # serving: each example alone


# -- a store written before heads were layer lists ------------------------------------------------------


class TodaysParallelBlock(nn.Module):
    """The parallel preset's block as servers before layer lists built it (and named its weights)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.left = nn.Linear(inputs, outputs)
        self.right = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.left(x) * self.right(x), min=0)


def todays_module(head: HeadConfig, inputs: int, outputs: int) -> nn.Sequential:
    """The head module a server before layer lists built for ``head`` (its code, as it was)."""
    layers: list[nn.Module] = [nn.Dropout(head.dropout)] if head.dropout > 0 else []
    if head.kind == "linear":
        layers.append(nn.Linear(inputs, outputs))
    elif head.kind == "two_layer":
        layers += [nn.Linear(inputs, head.hidden), nn.ReLU(), nn.Linear(head.hidden, outputs)]
    else:
        width = inputs
        for _ in range(head.blocks):
            layers.append(TodaysParallelBlock(width, head.hidden))
            width = head.hidden
        layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


TODAYS_HEADS = [
    HeadConfig(),
    HeadConfig("two_layer", hidden=6),
    HeadConfig("parallel", hidden=5, blocks=2),
    HeadConfig("parallel", hidden=5, blocks=3, dropout=0.5),
]


def write_todays_entry(store: Path, name: str, head: HeadConfig, seed: int) -> StandardizedHead:
    """An entry as a server before layer lists wrote it: its module's weight names, its manifest's head
    without ``layers``. Returns the module it holds."""
    torch.manual_seed(seed)
    module = StandardizedHead(
        todays_module(head, TINY_FEATURE_DIM, 3), torch.randn(TINY_FEATURE_DIM), torch.rand(TINY_FEATURE_DIM) + 0.5
    ).eval()
    ModelStore(store).save(
        name=name, base_model=TINY, head_spec=head, head=module, labels=["a", "b", "c"], loss="cross_entropy",
        job_id="before",
    )  # fmt: skip
    manifest = json.loads((store / name / MANIFEST).read_text())
    manifest["head"] = {key: manifest["head"][key] for key in ("kind", "hidden", "blocks", "dropout")}
    (store / name / MANIFEST).write_text(json.dumps(manifest))
    return module


def tiny_backbone() -> nn.Module:
    spec = get_model_spec(TINY)
    return spec.features(build_model(spec, WeightsSource.parse("random"))).eval()


def pixels(count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, 64, 64), dtype=np.float32)


def served_logits(server, model: str, batch: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("PIXELS", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    with triton.InferenceServerClient(server.target) as client:
        return client.infer(model, [tensor], client_timeout=60).as_numpy("LOGITS")


def torch_logits(head: nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head(tiny_backbone()(torch.from_numpy(batch))).numpy()


def assert_close(served: np.ndarray, expected: np.ndarray) -> None:
    """Equal within a relative 1e-4 of the logits' scale."""
    assert served.shape == expected.shape
    error = float(np.abs(served - expected).max() / max(np.abs(expected).max(), 1e-12))
    assert error <= 1e-4, error


@pytest.fixture
def tiny_server(serve_inprocess):
    def start(store, **overrides: object):
        settings: dict[str, object] = {
            "models": (TINY,),
            "weights": "random",
            "runtime": RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
            "model_store": store,
            "store_poll_seconds": 3600,  # the tests run the polls
        }
        settings.update(overrides)
        return serve_inprocess(**settings)

    return start


def test_a_store_written_before_layer_lists_loads_and_serves_the_same_logits(tmp_path: Path, tiny_server) -> None:
    store = tmp_path / "store"
    modules = {f"before-{n}": write_todays_entry(store, f"before-{n}", head, n) for n, head in enumerate(TODAYS_HEADS)}
    server = tiny_server(store)
    batch = pixels()
    for name, module in modules.items():
        manifest, rebuilt = ModelStore(store).load(name)
        assert manifest.head.layers == ()  # a preset, as it was written
        assert_close(torch_logits(rebuilt, batch), torch_logits(module, batch))
        assert_close(served_logits(server, name, batch), torch_logits(module, batch))


# -- hostile configs over both ports: INVALID_ARGUMENT before any image, nothing written ----------------


def hostile_heads() -> dict[str, pb.HeadSpec]:
    wide = pb.HeadLayer()
    wide.MergeFromString(b"\x0a\x06linear" + b"\x10\x80\x80\x80\x80\x08")  # width 2^31 as the wire's varint
    return {
        "10,000 layers": pb.HeadSpec(layers=[pb.HeadLayer(kind="relu")] * 10_000),
        "1,000 layers": pb.HeadSpec(layers=[pb.HeadLayer(kind="relu")] * 1_000),
        "100 layers": pb.HeadSpec(layers=[pb.HeadLayer(kind="relu")] * 100),
        "a width of 2^31": pb.HeadSpec(layers=[wide]),
        "a width of 2^31 - 1": pb.HeadSpec(layers=[pb.HeadLayer(kind="linear", width=2**31 - 1)]),
        "parameters over the limit": pb.HeadSpec(layers=[pb.HeadLayer(kind="linear", width=8192)] * 2),
        "an unknown layer": pb.HeadSpec(layers=[pb.HeadLayer(kind="conv2d", width=3)]),
        "p = 1": pb.HeadSpec(layers=[pb.HeadLayer(kind="dropout", p=1.0)]),
        "p < 0": pb.HeadSpec(layers=[pb.HeadLayer(kind="linear", width=4), pb.HeadLayer(kind="dropout", p=-0.5)]),
        "nested too deep": pb.HeadSpec(layers=[nested(20)]),
    }


def nested(depth: int) -> pb.HeadLayer:
    layer = pb.HeadLayer(kind="relu")
    for _ in range(depth):
        relu = pb.HeadBranch(layers=[pb.HeadLayer(kind="relu")])
        layer = pb.HeadLayer(kind="parallel", branches=[pb.HeadBranch(layers=[layer]), relu])
    return layer


EXPECTED = {
    "10,000 layers": "head layers: a head has at most 256 layers",  # the protocol's bound: 256 made at most
    "1,000 layers": "head layers: a head has at most 256 layers",
    "100 layers": "a head has at most 64 layers on this server (those inside parallel blocks counted), got 100",
    "a width of 2^31": "head layers[0]: linear width must be a positive integer (at most 2147483647), got -2147483648",
    "a width of 2^31 - 1": "head layers[0] (linear): width must be at most 8192 on this server, got 2147483647",
    "parameters over the limit": "has 67,272,706 parameters, over the limit of 50,000,000 (--max-head-parameters)",
    "an unknown layer": "head layers[0]: layer kind 'conv2d' is unknown; choose one of linear, relu, gelu, dropout",
    "p = 1": "head layers[0]: dropout p must be in [0, 1), got 1.0",
    "p < 0": "head layers[1]: dropout p must be in [0, 1), got -0.5",
    "nested too deep": "parallel blocks nest at most 8 deep",
}
REST_EXPECTED = {
    **EXPECTED,
    "10,000 layers": "part 'config' is over 65536 bytes",  # the port's bound on a config comes first
    "a width of 2^31": "the config part is not a FineTuneConfig in JSON",  # an int32 field refuses it as JSON
}


def hostile_config(name: str, head: pb.HeadSpec) -> pb.FineTuneConfig:
    return pb.FineTuneConfig(base_model=TINY, output_model="hostile", epochs=1, head=head)


def nothing_written(store: Path) -> None:
    written = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) if store.exists() else []
    assert written == [], written


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory) -> Iterator:
    from tests.inprocess import InProcessServer, tiny_config

    store = tmp_path_factory.mktemp("hostile") / "store"
    with InProcessServer(tiny_config(store, store_poll_seconds=3600)) as server:
        yield server, store


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_hostile_head_is_invalid_argument_over_grpc_before_any_image(hostile_server, case: str, caplog) -> None:
    """The stream holds the config and then waits: the answer comes while no example has been sent."""
    server, store = hostile_server
    sent_example = threading.Event()
    release = threading.Event()

    def requests():
        yield pb.CreateJobRequest(config=hostile_config(case, hostile_heads()[case]))
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
        jobs = pb_grpc.FineTuningStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10).jobs
    assert not sent_before_the_answer
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert EXPECTED[case] in error.value.details(), error.value.details()
    assert list(jobs) == []
    nothing_written(store)
    no_tracebacks(caplog)


async def _post_config_then_wait(url: str, config: str) -> tuple[int, dict]:
    """A multipart upload that sends its config part and the start of one example, then waits: the
    answer must come before the rest (read off a raw connection, as the body is still unfinished)."""
    boundary = "headlayers"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="config"; filename="config.json"\r\n'
        "Content-Type: application/json\r\n\r\n"
    ).encode()
    example = (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="a"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")  # ~200 KB, of which 128 KB are sent: the multipart
    part = head + config.encode() + example + png.getvalue()[: 128 * 1024]  # reader looks ahead for a boundary
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                f"POST /v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: {len(part) + 1_000_000}\r\n\r\n"
            ).encode()
            + part
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 60)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), json.loads(body)
    finally:
        writer.close()


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_hostile_head_is_invalid_argument_over_rest_before_any_image(hostile_server, case: str, caplog) -> None:
    from google.protobuf import json_format

    server, store = hostile_server
    config = json_format.MessageToJson(hostile_config(case, hostile_heads()[case]), indent=None)
    if case == "a width of 2^31":  # protobuf would not write it: the number as a client's JSON has it
        config = config.replace("-2147483648", "2147483648")
    status, answer = asyncio.run(_post_config_then_wait(server.http_url, config))
    assert status == 400, (status, answer)
    assert REST_EXPECTED[case] in answer["error"], answer
    nothing_written(store)
    no_tracebacks(caplog)


# -- each preset and a long list: publish, a second replica, a restart; logits equal torch's -------------


def train(server, name: str, head: HeadConfig) -> None:
    config = FineTuneConfig(base_model=TINY, output_model=name, head=head, epochs=2, batch_size=5, seed=3)
    with Client(server.target) as sdk:
        job = sdk.fine_tune(config, examples(), timeout=120)
    assert job.state == "succeeded", job.error


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_each_preset_and_a_long_list_survive_publish_a_replica_and_a_restart(
    kind: str, tiny_server, tmp_path: Path, request
) -> None:
    store = tmp_path / "shared" if kind == "directory" else request.getfixturevalue("s3_store")
    first, second = tiny_server(store), tiny_server(store)
    batch = pixels(4, seed=1)
    expected = {}
    for name, head in HEADS.items():
        train(first, f"head-{name.replace('_', '-')}", head)
    poll(second)
    for name, head in HEADS.items():
        model = f"head-{name.replace('_', '-')}"
        manifest, rebuilt = ModelStore(store).load(model)
        assert manifest.head == head  # the layer list, stored as data
        assert not rebuilt.training
        expected[model] = torch_logits(rebuilt, batch)
        assert_close(served_logits(first, model, batch), expected[model])
        assert ready(second, model)
        assert_close(served_logits(second, model, batch), expected[model])
    first.stop()
    second.stop()
    again = tiny_server(store)  # a restart on the same store
    for model, logits in expected.items():
        assert_close(served_logits(again, model, batch), logits)


def _wire_field(tag: int, payload: bytes) -> bytes:
    size, length = len(payload), b""
    while True:
        length += bytes([(size & 0x7F) | (0x80 if size > 0x7F else 0)])
        size >>= 7
        if not size:
            return bytes([tag]) + length + payload


def _nested_request(depth: int) -> bytes:
    """A CreateJobRequest whose head nests parallel blocks ``depth`` deep, written byte by byte (protobuf's
    Python library refuses to build one past its recursion limit; a hostile client is not so kind)."""
    relu = _wire_field(0x0A, b"relu")  # HeadLayer.kind
    layer = relu
    for _ in range(depth):
        branches = _wire_field(0x22, _wire_field(0x0A, layer)) + _wire_field(0x22, _wire_field(0x0A, relu))
        layer = _wire_field(0x0A, b"parallel") + branches
    config = _wire_field(0x0A, TINY.encode()) + _wire_field(0x12, b"deep") + _wire_field(0x1A, _wire_field(0x2A, layer))
    return _wire_field(0x0A, config)


@pytest.mark.parametrize("depth, message", [(9, "parallel blocks nest at most 8 deep"), (60, "not a valid protobuf")])
def test_nesting_past_any_bound_is_invalid_argument(hostile_server, depth: int, message: str, caplog) -> None:
    server, store = hostile_server
    with grpc.insecure_channel(server.target) as channel:
        create = channel.stream_unary(
            "/vision.v1.FineTuning/CreateJob", request_serializer=bytes, response_deserializer=pb.Job.FromString
        )
        with pytest.raises(grpc.RpcError) as error:
            create(iter([_nested_request(depth)]), timeout=60)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert message in error.value.details()
    nothing_written(store)
    no_tracebacks(caplog)


# -- the command line reads the same vocabulary -----------------------------------------------------------


def _cli_config(*options: str) -> FineTuneConfig:
    from vision_client.cli import Defaults, build_parser
    from vision_client.cli import config_from_args as client_config

    args = build_parser(Defaults()).parse_args(["fine-tune", "images", "--base", TINY, "--output", "x", *options])
    return client_config(args)


def test_the_command_line_takes_a_layer_list_and_the_presets() -> None:
    assert _cli_config("--layers", format_layers(LONG.layers)).head == LONG
    assert _cli_config("--head", "parallel", "--hidden", "8", "--blocks", "3").head == HEADS["parallel"]
    assert _cli_config("--layers", '[{"kind": "linear", "width": 4}, {"kind": "gelu"}]').head == HeadConfig(
        layers=(Layer("linear", width=4), Layer("gelu"))
    )


def test_a_bad_layer_list_on_the_command_line_says_where(capsys) -> None:
    with pytest.raises(SystemExit):
        _cli_config("--layers", "linear:64,relu,dropout:1.5")
    error = capsys.readouterr().err
    assert "argument --layers: layers: dropout p must be in [0, 1), got 1.5 at character 16" in error, error
    with pytest.raises(ConfigError, match="a two_layer head is a preset and takes no layers"):
        _cli_config("--head", "two_layer", "--layers", "relu")


# -- the console builds its form from the served vocabulary ---------------------------------------------


def test_the_page_carries_the_vocabulary_and_this_servers_head_limits() -> None:
    import html as markup
    import re

    from service.transport.rest.console import CONSOLE_FOLDER, INDEX, fill_page
    from tests.conftest import ROOT

    page = fill_page((ROOT / "service" / CONSOLE_FOLDER / INDEX).read_bytes(), FineTuneLimits(max_hidden=512))
    found = re.search(rb'data-fine-tuning="([^"]*)"', page)
    assert found is not None
    carried = json.loads(markup.unescape(found.group(1).decode("ascii")))
    blocks = {name: list(get_model_spec(name).block_names) for name in list_models()}  # each backbone's
    assert carried == {
        **vocabulary(),
        "limits": {"max_layers": MAX_HEAD_LAYERS, "max_width": 512},
        "backbone_blocks": blocks,
    }
    source = (ROOT / "service" / CONSOLE_FOLDER / INDEX).read_text()
    form = source[source.index('id="ft-form"') : source.index('id="ft-start"')]
    assert "two_layer" not in form and "<option" not in form  # no kind restated
    assert not re.search(r'<input id="ft-[a-z-]+" type="number"[^>]* value=', form)


def test_the_console_trains_a_layer_list_and_says_what_is_wrong_with_one(console_page, tmp_path: Path) -> None:
    from tests.conftest import TOKEN
    from tests.test_console import digit_images

    page = console_page
    page.open("finetune")
    page.set_token(TOKEN)
    defaults = vocabulary()["defaults"]
    assert [o.get_attribute("value") for o in page.all("#ft-head option")] == list(vocabulary()["head_kinds"])
    assert page.find("#ft-epochs").get_attribute("value") == str(defaults["epochs"])
    assert float(page.find("#ft-lr").get_attribute("value")) == defaults["optimizer"]["lr"]
    assert page.find("#ft-refit").is_selected() is defaults["refit"]
    assert not page.find("#ft-layers-field").is_displayed()

    classes = digit_images(6, (0, 1))
    for label, images in classes.items():
        page.type("ft-class-name", label)
        for number, image in enumerate(images):
            (tmp_path / f"{label}-{number}.png").write_bytes(image)
        page.upload("ft-class-files", *[tmp_path / f"{label}-{n}.png" for n in range(len(images))])
    page.wait(lambda d: d.find_element("id", "ft-summary").text == "12 images in 2 classes")
    page.type("ft-output", "console-layers")
    page.find("#ft-head option[value=custom]").click()
    assert page.find("#ft-layers-field").is_displayed() and not page.find("#ft-hidden-field").is_displayed()
    assert "batch_norm" in page.text("ft-layers-hint") and f"At most {MAX_HEAD_LAYERS} layers" in page.text(
        "ft-layers-hint"
    )

    page.type("ft-layers", "[{kind: linear}")
    page.find("#ft-start").click()
    page.wait(lambda d: "Layers: not valid JSON" in d.find_element("id", "ft-status").text)
    assert page.text("ft-job") == ""  # nothing was sent

    page.type("ft-layers", '[{"kind": "linear", "width": 16}, {"kind": "dropout", "p": 1.5}]')
    page.find("#ft-start").click()
    page.wait(lambda d: "head layers[1]: dropout p must be in [0, 1)" in d.find_element("id", "ft-status").text)

    layers = parse_layers("linear:16,batch_norm,gelu,dropout:0.25,parallel(linear:8|linear:8,relu)")
    wire = [json.loads(json_format.MessageToJson(layer)) for layer in to_message(
        FineTuneConfig(TINY, "x", head=HeadConfig(layers=layers))
    ).head.layers]  # fmt: skip
    page.type("ft-layers", json.dumps(wire))
    page.type("ft-epochs", "2")
    page.find("#ft-start").click()
    page.wait_for_job()
    assert "succeeded: console-layers is served" in page.text("ft-status"), page.text("ft-status")
    store = page.server.config.model_store
    assert ModelStore(store).read_manifest("console-layers").head == HeadConfig(layers=layers)
    page.no_alert()


@pytest.fixture
def console_page(browser, console_server, screenshots):  # noqa: F811  (the imported fixtures)
    from tests.test_console import Page

    page = Page(browser, console_server, screenshots)
    page.server = console_server
    yield page
    browser.execute_script("sessionStorage.clear()")


@pytest.mark.parametrize(
    "layers, reason, message",
    [
        ([{"kind": "relu"}] * 10_000, "bad_dimensions", "at most 256 layers"),
        ([{"kind": "relu"}] * 100, "bad_dimensions", "at most 64 layers on this server"),
        ([{"kind": "conv2d"}], "unknown_head", "layer kind 'conv2d' is unknown"),
        ([{"kind": "linear", "width": 2**31}], "bad_dimensions", "linear width must be a positive integer"),
        ([{"kind": "linear", "width": 9000}], "bad_dimensions", "width must be at most 8192"),
        ([{"kind": "dropout", "p": 1.0}], "bad_dimensions", r"dropout p must be in \[0, 1\)"),
        ([{"kind": "relu", "code": "import os"}], "bad_dimensions", "unknown field 'code'"),
        ([{"kind": "parallel", "branches": [[{"kind": "relu"}]] * 2}], None, None),  # a good one, for contrast
    ],
)
def test_a_manifest_with_a_hostile_head_is_skipped_with_its_reason(tmp_path: Path, layers, reason, message) -> None:
    from service.errors import StoreEntryError

    store = tmp_path / "store"
    torch.manual_seed(0)
    head = HeadConfig(layers=[Layer("relu")])
    module = StandardizedHead(build_head(head, TINY_FEATURE_DIM, 2), torch.zeros(TINY_FEATURE_DIM), torch.ones(16))
    ModelStore(store).save(
        name="hostile", base_model=TINY, head_spec=head, head=module, labels=["a", "b"], loss="cross_entropy",
        job_id="test",
    )  # fmt: skip
    manifest = json.loads((store / "hostile" / MANIFEST).read_text())
    manifest["head"]["layers"] = layers
    (store / "hostile" / MANIFEST).write_text(json.dumps(manifest))
    if reason is None:
        assert ModelStore(store).read_manifest("hostile").head.layers[0].kind == "parallel"
        return
    with pytest.raises(StoreEntryError, match=message) as error:
        ModelStore(store).read_manifest("hostile")
    assert error.value.reason.value == reason
