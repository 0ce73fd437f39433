"""Our Open Inference Protocol proto agrees, field by field, with the one compiled into tritonclient."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2

from vision_client.protocol.stubs.inference import grpc_service_pb2 as ours
from vision_client.protocol.stubs.inference import model_config_pb2 as ours_config

triton = pytest.importorskip("tritonclient.grpc.service_pb2")
triton_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def _as_proto(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    return proto


def _messages(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(nested, name)

    for message in proto.message_type:
        walk(message, proto.package)
    return found


def _enums(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    found = {f"{proto.package}.{e.name}": e for e in proto.enum_type}
    for name, message in _messages(proto).items():
        found.update({f"{name}.{e.name}": e for e in message.enum_type})
    return found


OURS = _as_proto(ours.DESCRIPTOR)
THEIRS = _as_proto(triton.DESCRIPTOR)
OUR_MESSAGES = _messages(OURS)
THEIR_MESSAGES = _messages(THEIRS)
# model_config.proto: we declare only the fields we fill (Triton's has dozens), so for its
# messages ours must be a subset with the same numbers and types, not the whole message.
OURS_CONFIG = _as_proto(ours_config.DESCRIPTOR)
THEIRS_CONFIG = _as_proto(triton_config.DESCRIPTOR)
OUR_CONFIG_MESSAGES = _messages(OURS_CONFIG)
THEIR_CONFIG_MESSAGES = _messages(THEIRS_CONFIG)


def _assert_fields_match(
    name: str, mine: descriptor_pb2.DescriptorProto, theirs: descriptor_pb2.DescriptorProto
) -> None:
    their_fields = {f.name: f for f in theirs.field}
    assert [f.name for f in mine.field] == [f.name for f in theirs.field if f.name in {m.name for m in mine.field}]
    for field in mine.field:
        assert field.name in their_fields, f"{name}.{field.name} is not in Triton's {name}"
        other = their_fields[field.name]
        assert (field.number, field.type, field.label, field.type_name) == (
            other.number,
            other.type,
            other.label,
            other.type_name,
        ), f"{name}.{field.name} differs from Triton's"
        assert field.HasField("oneof_index") == other.HasField("oneof_index")
        if field.HasField("oneof_index"):
            assert mine.oneof_decl[field.oneof_index].name == theirs.oneof_decl[other.oneof_index].name


def test_same_package() -> None:
    assert OURS.package == THEIRS.package == "inference"


@pytest.mark.parametrize("name", sorted(OUR_MESSAGES))
def test_message_fields_match_triton(name: str) -> None:
    assert name in THEIR_MESSAGES, f"{name} is not a Triton message"
    mine, theirs = OUR_MESSAGES[name], THEIR_MESSAGES[name]
    _assert_fields_match(name, mine, theirs)
    # Every field Triton has, we have too: the messages are the same on the wire.
    assert {f.name for f in mine.field} == {f.name for f in theirs.field}, f"{name} lacks some of Triton's fields"


def test_config_package_and_file() -> None:
    assert OURS_CONFIG.package == THEIRS_CONFIG.package == "inference"
    assert "inference/model_config.proto" in OURS.dependency


@pytest.mark.parametrize("name", sorted(OUR_CONFIG_MESSAGES))
def test_config_message_fields_match_triton(name: str) -> None:
    assert name in THEIR_CONFIG_MESSAGES, f"{name} is not a message of Triton's model_config.proto"
    _assert_fields_match(name, OUR_CONFIG_MESSAGES[name], THEIR_CONFIG_MESSAGES[name])


@pytest.mark.parametrize("name", sorted(_enums(OURS_CONFIG)))
def test_config_enums_match_triton(name: str) -> None:
    theirs = _enums(THEIRS_CONFIG)
    assert name in theirs, f"{name} is not an enum of Triton's model_config.proto"
    mine = {v.name: v.number for v in _enums(OURS_CONFIG)[name].value}
    assert mine == {v.name: v.number for v in theirs[name].value}


def test_config_decodes_with_tritons_descriptors() -> None:
    """A config we fill, serialized, reads back the same through tritonclient's classes."""
    from google.protobuf import json_format

    config = ours_config.ModelConfig(
        name="alexnet",
        platform="pytorch_torchvision",
        max_batch_size=8,
        input=[ours_config.ModelInput(name="PIXELS", data_type=ours_config.TYPE_FP32, dims=[3, -1, -1], optional=True)],
        output=[ours_config.ModelOutput(name="LOGITS", data_type=ours_config.TYPE_FP32, dims=[1000])],
        dynamic_batching=ours_config.ModelDynamicBatching(
            max_queue_delay_microseconds=5000,
            default_queue_policy=ours_config.ModelQueuePolicy(max_queue_size=512),
        ),
        instance_group=[
            ours_config.ModelInstanceGroup(kind=ours_config.ModelInstanceGroup.KIND_GPU, count=1, gpus=[0, 1])
        ],
    )
    response = ours.ModelConfigResponse(config=config)
    decoded = triton.ModelConfigResponse.FromString(response.SerializeToString())
    assert json_format.MessageToDict(decoded) == json_format.MessageToDict(response)
    assert decoded.config.instance_group[0].kind == triton_config.ModelInstanceGroup.KIND_GPU


def test_service_methods_match_triton() -> None:
    (our_service,) = OURS.service
    their_service = next(s for s in THEIRS.service if s.name == our_service.name)
    assert our_service.name == "GRPCInferenceService"
    theirs = {m.name: m for m in their_service.method}
    for method in our_service.method:
        other = theirs[method.name]
        assert (method.input_type, method.output_type, method.client_streaming, method.server_streaming) == (
            other.input_type,
            other.output_type,
            other.client_streaming,
            other.server_streaming,
        ), method.name
    expected = {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
    }
    assert expected <= {m.name for m in our_service.method}


def test_stubs_are_generated_from_protos(tmp_path) -> None:
    """The committed stubs are what `make protos` makes from protos/ today."""
    import filecmp
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("generate", root / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path / "stubs")
    committed = root / "clients" / "python" / "vision_client" / "protocol" / "stubs"
    for fresh in (tmp_path / "stubs").rglob("*.py*"):
        relative = fresh.relative_to(tmp_path / "stubs")
        assert filecmp.cmp(fresh, committed / relative, shallow=False), f"{relative} is stale: run `make protos`"
