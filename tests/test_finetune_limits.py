"""Fine-tuning within bounds: every number of a config, names, labels, head size, and the
caps on uploads and queued jobs, each refused at CreateJob with a clear status."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest

from service.config import FineTuneLimits
from service.errors import InvalidInputError
from service.finetune.examples import ExampleCollector
from service.finetune.heads import build_head
from service.finetune.names import MODEL_NAME_PATTERN, is_model_name, validate_model_name
from service.finetune.spec import check_limits, config_from_wire, head_parameters
from tests.support.finetune_data import digits
from vision_client.errors import InvalidInputError as ClientInvalidInputError
from vision_client.protocol import FineTuneConfig, HeadConfig, OptimizerConfig
from vision_client.protocol.labels import label_problem, label_rule
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

LIMITS = FineTuneLimits()
NOT_FINITE = [math.nan, math.inf, -math.inf]
WIRE_TYPES = {"head": pb.HeadSpec, "optimizer": pb.OptimizerSpec}


def python_config(change: dict) -> FineTuneConfig:
    """The SDK's config with ``change`` (nested dicts for head and optimizer), checked as it is made."""
    nested = {"head": HeadConfig, "optimizer": OptimizerConfig}
    fields = {key: nested[key](**value) if key in nested else value for key, value in change.items()}
    return FineTuneConfig(**{"base_model": "alexnet", "output_model": "ok", **fields})


def wire_config(change: dict) -> pb.FineTuneConfig:
    """The same change in a CreateJob message (ValueError or TypeError where the wire cannot carry it)."""
    fields = {key: WIRE_TYPES[key](**value) if key in WIRE_TYPES else value for key, value in change.items()}
    return pb.FineTuneConfig(**{"base_model": "alexnet", "output_model": "ok", **fields})


@pytest.mark.parametrize(
    "change",
    [
        *({"optimizer": {"lr": v}} for v in NOT_FINITE),
        *({"optimizer": {"weight_decay": v}} for v in NOT_FINITE),
        *({"optimizer": {"momentum": v}} for v in NOT_FINITE),
        *({"optimizer": {"beta1": v}} for v in NOT_FINITE),
        *({"head": {"dropout": v}} for v in NOT_FINITE),
        *({"validation_fraction": v} for v in NOT_FINITE),
        {"optimizer": {"weight_decay": 1e30}},
        {"optimizer": {"lr": -1.0}},
        {"seed": 2**64},
        {"seed": -1},
        {"epochs": -5},
        {"batch_size": 2**31 - 1},
        {"early_stopping_patience": 2**31 - 1},
        {"head": {"hidden": -1}},
        {"head": {"blocks": 0}},
        {"head": {"hidden": LIMITS.max_hidden + 1}},
    ],
)
def test_config_numbers_out_of_range_are_invalid(change: dict) -> None:
    """Refused by the config itself or by the server's limits, made in Python or read from the wire."""
    with pytest.raises((InvalidInputError, ClientInvalidInputError), match="must be"):
        check_limits(python_config(change), LIMITS)
    try:
        message = wire_config(change)
    except (ValueError, TypeError):
        return  # a seed of 2**64 or -1 cannot be sent
    if any(value == 0 for part in change.values() for value in (part.values() if isinstance(part, dict) else [part])):
        return  # a zero on the wire is the default
    with pytest.raises(InvalidInputError, match="must be"):
        check_limits(config_from_wire(message), LIMITS)


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_every_seed_the_wire_carries_trains(seed: int) -> None:
    """One bound for the seed: the wire's uint64, in the SDK, the server and the trainer alike."""
    import torch

    from service.finetune.trainer import train_head

    config = check_limits(config_from_wire(wire_config({"seed": seed, "epochs": 1})), LIMITS)
    assert config.seed == seed
    features, labels = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    assert train_head(features, labels, config, num_outputs=2).metrics.epochs_run == 1


@pytest.mark.parametrize("kind", ["linear", "two_layer", "parallel"])
def test_head_parameter_count_matches_the_built_head(kind: str) -> None:
    head = HeadConfig(kind=kind, hidden=7, blocks=3)
    built = sum(p.numel() for p in build_head(head, 11, 5).parameters())
    assert head_parameters(head, 11, 5) == built


def test_a_head_over_the_parameter_budget_is_refused_before_examples() -> None:
    config = FineTuneConfig("alexnet", "big", head=HeadConfig(kind="parallel", hidden=8192, blocks=8))
    with pytest.raises(InvalidInputError, match="parameters, over the limit"):
        check_limits(config, LIMITS, feature_dim=4096)


@pytest.mark.parametrize("name", ["", "liveness", "a\n", "Pets", "-pets", "a/b", "..", "x" * 64, "caf\u00e9"])
def test_bad_and_reserved_model_names_are_refused(name: str) -> None:
    assert not is_model_name(name)
    with pytest.raises(InvalidInputError, match=r"reserved|pattern"):
        validate_model_name(name)


def test_the_pattern_takes_ordinary_names() -> None:
    for name in ("pets", "pets-v2.1", "0day", "a" * 63):
        assert validate_model_name(name) == name
    assert MODEL_NAME_PATTERN == "[a-z0-9][a-z0-9._-]{0,62}"


def test_labels_are_bounded_in_length_count_and_bytes() -> None:
    config = FineTuneConfig("alexnet", "x")
    limits = FineTuneLimits(max_label_length=8, max_labels=2, max_total_bytes=1000)
    collector = ExampleCollector(config, limits)
    with pytest.raises(InvalidInputError, match="is 9 bytes of UTF-8, over the limit of 8"):
        collector.add(b"img", "x" * 9, [])
    with pytest.raises(InvalidInputError, match=r"U\+000A .*a control character"):
        collector.add(b"img", "a\nb", [])
    collector.add(b"img", "cat", [])
    collector.add(b"img", "dog", [])
    with pytest.raises(InvalidInputError, match="at most 2 classes"):
        collector.add(b"img", "emu", [])
    collector.add(b"img", "cat", [])  # a known class is fine
    # Labels count toward the byte limit: long labels alone exhaust it.
    long_labels = ExampleCollector(config, FineTuneLimits(max_total_bytes=1000))
    with pytest.raises(InvalidInputError, match="exceed 1000 bytes"):
        for i in range(100):
            long_labels.add(b"i", f"{i:03d}" + "l" * 100, [])


# One line of visible text: what the rule refuses, each with the character named.
REFUSED_LABELS = {
    "\u202eevil": "U+202E (RIGHT-TO-LEFT OVERRIDE)",
    "a\u202ab": "U+202A (LEFT-TO-RIGHT EMBEDDING)",
    "a\u2066b": "U+2066 (LEFT-TO-RIGHT ISOLATE)",
    "a\u2069": "U+2069 (POP DIRECTIONAL ISOLATE)",
    "x\u200f": "U+200F (RIGHT-TO-LEFT MARK)",
    "x\u200e": "U+200E (LEFT-TO-RIGHT MARK)",
    "x\u061c": "U+061C (ARABIC LETTER MARK)",
    "zero\u200bwidth": "U+200B (ZERO WIDTH SPACE)",
    "\ufeffbom": "U+FEFF (ZERO WIDTH NO-BREAK SPACE)",
    "soft\u00adhyphen": "U+00AD (SOFT HYPHEN)",
    "tag\U000e0041": "U+E0041 (TAG LATIN CAPITAL LETTER A)",
    "no\u00a0break": "U+00A0 (NO-BREAK SPACE)",
    "line\u2028sep": "U+2028 (LINE SEPARATOR)",
    "tab\tbed": "U+0009",
    "bell\x07": "U+0007",
    "del\x7f": "U+007F",
    "c1\x85": "U+0085",
    "private\ue000": "U+E000",
    "unassigned\U000e0080": "U+E0080",
    "lone\ud800": "U+D800",
}
ALLOWED_LABELS = [
    "cat",
    '12" vinyl',
    "\u05e9\u05dc\u05d5\u05dd",
    "\u0645\u0631\u062d\u0628\u0627 1",
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    "\U0001f469\u200d\U0001f52c",
    "caf\u00e9 cr\u00e8me",
    "\u65e5\u672c",
    "a  b",
    "<b>&amp;</b>",
]


@pytest.mark.parametrize(
    "label, named",
    REFUSED_LABELS.items(),
    ids=[f"U+{ord(next(c for c in k if not c.isprintable())):04X}" for k in REFUSED_LABELS],
)
def test_a_label_with_a_control_format_or_odd_space_character_is_refused(label: str, named: str) -> None:
    """The rule closes what ``str.isprintable()`` closed and says which character, by name;
    the collector of a job applies it."""
    problem = label_problem(label, LIMITS.max_label_length)
    assert problem is not None and named in problem, problem
    assert "remove it" in problem
    collector = ExampleCollector(FineTuneConfig("alexnet", "x"), LIMITS)
    with pytest.raises(InvalidInputError) as error:
        collector.add(b"img", label, [])
    assert named in error.value.message
    assert not any(not c.isprintable() for c in error.value.message), "the message repeats the character"


@pytest.mark.parametrize("label", ALLOWED_LABELS)
def test_labels_of_any_script_with_joiners_are_taken(label: str) -> None:
    assert label_problem(label, LIMITS.max_label_length) is None
    ExampleCollector(FineTuneConfig("alexnet", "x"), LIMITS).add(b"img", label, [])


def test_the_rule_counts_utf8_bytes_and_checks_characters_without_a_limit() -> None:
    hebrew = "\u05d0" * 64  # 128 bytes of UTF-8
    assert label_problem(hebrew, 128) is None
    assert label_problem(hebrew + "x", 128) == "is 129 bytes of UTF-8, over the limit of 128; use a shorter class name"
    assert label_problem("x" * 5000) is None  # no limit given: characters only
    assert label_problem("") == "is empty; give every class a name"
    assert label_problem("\u202e") is not None
    rule = label_rule(LIMITS.max_label_length)
    assert rule["maxBytes"] == 128 and "Cf" in rule["refusedCategories"]
    assert sorted(rule["allowedCharacters"]) == [" ", "\u200c", "\u200d"]


# -- over the wire -------------------------------------------------------------


def _config(output: str = "limited", **fields) -> pb.FineTuneConfig:
    config = pb.FineTuneConfig(base_model="alexnet", output_model=output, epochs=1, batch_size=4)
    for key, value in fields.items():
        if key in ("head", "optimizer"):
            getattr(config, key).CopyFrom(value)
        else:
            setattr(config, key, value)
    return config


def _examples(count: int = 4) -> pb.CreateJobRequest:
    images, targets = digits()
    examples = [pb.Example(image=images[i], label=str(targets[i] % 2)) for i in range(count)]
    return pb.CreateJobRequest(examples=pb.ExampleBatch(examples=examples))


def _create(stub, config: pb.FineTuneConfig, *batches: pb.CreateJobRequest) -> pb.Job:
    return stub.CreateJob(iter([pb.CreateJobRequest(config=config), *batches]), timeout=120)


@pytest.fixture(scope="module")
def store_server(tmp_path_factory, weights_dir):  # -> tests.inprocess.InProcessServer
    """One in-process AlexNet server for the module, with room for one upload and one queued job: the
    tests below leave no job queued and no upload open (the last one cancels its job)."""
    from tests.inprocess import alexnet_config, running

    limits = FineTuneLimits(max_uploads=1, max_queued_jobs=1)
    config = alexnet_config(tmp_path_factory.mktemp("limited") / "store", weights_dir, fine_tuning=limits)
    with running(config) as server:
        yield server


@pytest.fixture
def stub(store_server):
    with grpc.insecure_channel(store_server.target) as channel:
        yield pb_grpc.FineTuningStub(channel)


@pytest.mark.parametrize(
    "config, message",
    [
        (_config(optimizer=pb.OptimizerSpec(weight_decay=math.inf)), "weight_decay"),
        (_config(optimizer=pb.OptimizerSpec(lr=math.nan)), "optimizer lr"),
        (_config(optimizer=pb.OptimizerSpec(lr=11.0)), "learning rate must be at most 10"),
        (_config(validation_fraction=math.nan), "validation_fraction"),
        (_config(epochs=LIMITS.max_epochs + 1), "epochs must be at most"),
        (_config(output="liveness"), "reserved"),
        (_config(output=""), "output_model must be a model name"),
        (_config(output="pets\n"), "not a valid model name"),
        (_config(output="alexnet"), "built-in model"),
        (_config(head=pb.HeadSpec(kind="parallel", hidden=8192, blocks=8)), "over the limit"),
    ],
)
def test_create_job_refuses_bad_specs_with_invalid_argument(stub, config, message) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _create(stub, config, _examples())
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_built_in_names_get_one_status_everywhere(stub) -> None:
    with pytest.raises(grpc.RpcError) as deleting:
        stub.DeleteModel(pb.DeleteModelRequest(name="alexnet"))
    with pytest.raises(grpc.RpcError) as creating:
        _create(stub, _config(output="alexnet"), _examples())
    assert deleting.value.code() is creating.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_an_undecodable_example_is_refused_at_create_job(stub) -> None:
    batch = _examples(4)
    batch.examples.examples[2].image = b"\xff\xd8\xff\xe0 not really a jpeg"
    with pytest.raises(grpc.RpcError) as error:
        _create(stub, _config(), batch)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "example 2" in error.value.details()


def test_concurrent_uploads_and_queued_jobs_are_capped(stub) -> None:
    # One upload open (max_uploads=1): a second stream is refused at once.
    held = threading.Event()

    def slow_requests():
        yield pb.CreateJobRequest(config=_config("first", epochs=1000, batch_size=1))
        yield _examples()
        held.wait()  # the stream stays open until the test lets it go

    first: dict = {}

    def upload_first() -> None:
        try:
            first["job"] = stub.CreateJob(slow_requests(), timeout=120)
        except grpc.RpcError as exc:  # a probe held the one slot just then: the test starts it again
            first["error"] = exc

    def start_first() -> threading.Thread:
        first.clear()
        started = threading.Thread(target=upload_first)
        started.start()
        return started

    thread = start_first()
    try:
        for _ in range(600):  # until the first stream holds its slot (an invalid probe takes none for long)
            if "error" in first:
                assert first["error"].code() is grpc.StatusCode.RESOURCE_EXHAUSTED, first["error"]
                thread = start_first()
            with pytest.raises(grpc.RpcError) as error:
                _create(stub, _config("Invalid Name"), _examples())
            if error.value.code() is not grpc.StatusCode.INVALID_ARGUMENT:
                break
            time.sleep(0.05)
        assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-job-uploads" in error.value.details()
    finally:
        held.set()
        thread.join(120)
    job = first["job"]
    # One job queued or running (max_queued_jobs=1): the next one is refused, before its examples.
    with pytest.raises(grpc.RpcError) as error:
        _create(stub, _config("second"), _examples())
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queued-jobs" in error.value.details()
    stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120))
    assert events[-1].kind == "cancelled"


def test_every_cap_is_a_flag_and_an_environment_variable() -> None:
    from service.cli import build_serve_parser, config_from_args

    flags = {
        "--max-finished-jobs": "max_finished_jobs",
        "--max-queued-jobs": "max_queued_jobs",
        "--max-job-uploads": "max_uploads",
        "--max-job-examples": "max_examples",
        "--max-job-bytes": "max_total_bytes",
        "--max-head-parameters": "max_head_parameters",
        "--max-labels": "max_labels",
        "--max-label-length": "max_label_length",
    }
    argv = [part for i, flag in enumerate(flags) for part in (flag, str(i + 1))]
    limits = config_from_args(build_serve_parser({}).parse_args(argv)).fine_tuning
    assert [getattr(limits, field) for field in flags.values()] == list(range(1, len(flags) + 1))
    environ = {"VISION_SERVE_MAX_FINISHED_JOBS": "7"}
    assert config_from_args(build_serve_parser(environ).parse_args([])).fine_tuning.max_finished_jobs == 7
    with pytest.raises(SystemExit):
        build_serve_parser({}).parse_args(["--max-queued-jobs", "0"])


def test_a_label_with_an_override_is_refused_at_create_job_on_both_ports(serve_inprocess) -> None:
    """gRPC and the REST multipart upload reach the one rule: INVALID_ARGUMENT (400) naming the
    character, and the server goes on."""
    import asyncio

    import aiohttp

    server = serve_inprocess()
    images, _ = digits()
    batch = _examples(4)
    batch.examples.examples[1].label = "\u202eevil"
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as error:
        _create(pb_grpc.FineTuningStub(channel), _config("override"), batch)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "example 1's label '\\u202eevil' has U+202E (RIGHT-TO-LEFT OVERRIDE)" in error.value.details()

    async def upload() -> tuple[int, str]:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("config", '{"baseModel": "alexnet", "outputModel": "override-rest"}', filename="config.json",
                       content_type="application/json")  # fmt: skip
        for index, label in enumerate(["a", "\u202eevil", "a", "b"]):
            form.add_field(label, images[index], filename=f"{index}.png", content_type="image/png")
        async with aiohttp.ClientSession() as session, session.post(f"{server.http_url}/v1/jobs", data=form) as answer:
            return answer.status, (await answer.json())["error"]

    status, message = asyncio.run(upload())
    assert status == 400 and "has U+202E (RIGHT-TO-LEFT OVERRIDE)" in message, (status, message)
