"""Every value a caller sends goes through one rule (``service/transport/values.py``): numbers a
datatype or a protobuf field cannot hold, NaN and infinity however JSON spells them, integers of
thousands of digits, deep nesting, wrong types and bad timeouts are 400 / INVALID_ARGUMENT naming
the field, on both ports, with no traceback in the log. Images that do not decode are refused
without echoing Python's reprs (heap addresses). Multipart field names are read as the HTML
standard has browsers write them."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import struct
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInputError
from service.transport import values
from tests.tiny import TINY
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

INTEGER_RANGES = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
FLOAT_LIMITS = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": 1.7976931348623157e308}
NON_FINITE_JSON = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400")
HUGE_INT = "9" * 5000  # past Python's own 4,300-digit limit for int()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory) -> Iterator[object]:
    from tests.inprocess import InProcessServer, tiny_config

    with InProcessServer(tiny_config(tmp_path_factory.mktemp("store"))) as server:
        yield server


def post(server, path: str, body: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def refused(server, path: str, body: bytes | str, *fragments: str, headers: dict[str, str] | None = None) -> str:
    status, answer = post(server, path, body, headers)
    assert status == 400, (status, answer[:400])
    message = json.loads(answer)["error"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return str(message)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []


def pixels_body(data: str, datatype: str = "FP32", shape: str = "[1]", parameters: str = "{}") -> str:
    return (
        f'{{"inputs": [{{"name": "PIXELS", "datatype": "{datatype}", "shape": {shape}, "data": {data}}}], '
        f'"parameters": {parameters}}}'
    )


INFER = f"/v2/models/{TINY}/infer"


# -- the rule itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", list(INTEGER_RANGES))
def test_integers_out_of_each_datatypes_range_are_refused_with_their_place(datatype: str) -> None:
    low, high = INTEGER_RANGES[datatype]
    assert values.tensor([[low, high]], datatype, "inputs[0]").tolist() == [low, high]
    for bad in (low - 1, high + 1, 10**300, 1.5, True, "1", None):
        with pytest.raises(InvalidInputError) as raised:
            values.tensor([[low], [bad]], datatype, "inputs[0]")
        assert "inputs[0].data, element 1" in raised.value.message


@pytest.mark.parametrize("datatype", list(FLOAT_LIMITS))
def test_numbers_beyond_each_float_datatype_or_not_finite_are_refused(datatype: str) -> None:
    limit = FLOAT_LIMITS[datatype]
    assert values.tensor([limit, -limit, 3], datatype, "inputs[0]").tolist() == [limit, -limit, 3]
    for bad in (limit * 2 if datatype != "FP64" else 10**309, float("nan"), float("inf"), -float("inf"), "2", None):
        with pytest.raises(InvalidInputError) as raised:
            values.tensor([0, bad], datatype, "inputs[0]")
        assert "inputs[0].data, element 1" in raised.value.message


def test_bool_tensors_take_booleans_only() -> None:
    assert values.tensor([True, False], "BOOL", "x").tolist() == [True, False]
    for bad in (0, 1, "true", None):
        with pytest.raises(InvalidInputError):
            values.tensor([True, bad], "BOOL", "x")


@pytest.mark.parametrize("spelling", [*NON_FINITE_JSON, HUGE_INT, "-" + HUGE_INT])
def test_json_numbers_that_no_field_holds_parse_and_are_refused_where_they_are_used(spelling: str) -> None:
    data = values.loads(f'{{"data": [1, {spelling}], "parameters": {{"p": {spelling}}}}}', "the body")
    with pytest.raises(InvalidInputError) as raised:
        values.tensor(data["data"], "FP64", "inputs[0]")
    assert "element 1" in raised.value.message and "0x" not in raised.value.message
    with pytest.raises(InvalidInputError) as raised:
        values.parameters(data["parameters"], pb.ModelInferRequest().parameters, "parameters")
    assert "parameters.p" in raised.value.message and len(raised.value.message) < 300


def test_deep_nesting_is_refused_by_the_parser_and_by_the_tensor_rank() -> None:
    with pytest.raises(InvalidInputError, match="nests JSON too deeply"):
        values.loads("[" * 200_000 + "]" * 200_000, "the body")
    with pytest.raises(InvalidInputError, match="at most 8 dimensions"):
        values.tensor(values.loads("[" * 50 + "1" + "]" * 50, "the body"), "FP32", "inputs[0]")


# -- over REST ----------------------------------------------------------------------------------


def test_rest_tensor_values_no_datatype_holds_are_400_naming_the_element(tiny_server, caplog) -> None:
    for datatype, (low, high) in INTEGER_RANGES.items():
        refused(tiny_server, INFER, pixels_body(f"[{low}, {high + 1}]", datatype, "[2]"), "inputs[0].data, element 1")
    refused(tiny_server, INFER, pixels_body("[1, 70000]", "FP16", "[2]"), "element 1", "FP16")
    refused(tiny_server, INFER, pixels_body("[1, 1e39]", "FP32", "[2]"), "element 1", "FP32")
    refused(tiny_server, INFER, pixels_body(f"[1, 1{'0' * 330}]", "FP32", "[2]"), "element 1", "331 digits")
    refused(tiny_server, INFER, pixels_body(f"[1, {HUGE_INT}]", "FP64", "[2]"), "element 1", "5000 digits")
    for spelling in NON_FINITE_JSON:
        refused(tiny_server, INFER, pixels_body(f"[[1, {spelling}]]", "FP32", "[1, 2]"), "element 1", "finite")
    refused(tiny_server, INFER, pixels_body('[1, "2"]'), "element 1", "not a number")
    refused(tiny_server, INFER, pixels_body('[1, {"a": 1}]'), "element 1")
    refused(tiny_server, INFER, pixels_body('"abc"'), "inputs[0].data must be a list")
    refused(tiny_server, INFER, pixels_body("[1]", "COMPLEX64"), "COMPLEX64")
    refused(tiny_server, INFER, pixels_body("[1]", shape="[1.5]"), "shape must be a list of integers")
    refused(tiny_server, INFER, pixels_body("[1]", shape=f"[{HUGE_INT}]"), "shape must be a list of integers")
    refused(tiny_server, INFER, pixels_body("[" * 20 + "1" + "]" * 20), "at most 8 dimensions")
    refused(tiny_server, INFER, "[" * 100_000 + "]" * 100_000, "nests JSON too deeply")
    no_tracebacks(caplog)


def test_rest_parameters_of_every_request_are_checked_by_the_one_rule(tiny_server, caplog) -> None:
    good = "[[[[0.5]]]]"
    for spelling in (*NON_FINITE_JSON, HUGE_INT, str(2**64), str(-(2**63) - 1), "[1]", '{"a": {"b": 1}}', "null"):
        refused(
            tiny_server, INFER, pixels_body(good, shape="[1,1,1,1]", parameters=f'{{"p": {spelling}}}'), "parameters.p"
        )
        body = json.dumps({"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 1, 1, 1], "data": [0.5]}]})
        body = body[:-1] + f', "outputs": [{{"name": "LOGITS", "parameters": {{"classification": {spelling}}}}}]}}'
        refused(tiny_server, INFER, body, "classification")
        refused(
            tiny_server,
            f"/v2/repository/models/{TINY}/load",
            f'{{"parameters": {{"config": {spelling}}}}}',
            "parameters.config",
        )
        refused(
            tiny_server,
            f"/v2/repository/models/{TINY}/unload",
            f'{{"parameters": {{"x": {spelling}}}}}',
            "parameters.x",
        )
        for field in ("offset", "byte_size"):
            refused(
                tiny_server,
                "/v2/systemsharedmemory/region/r/register",
                f'{{"key": "/k", "offset": 0, "byte_size": 8, "{field}": {spelling}}}',
                field,
            )
    # The load request's parameter of an int64 is taken to the servicer, which says what it takes.
    refused(tiny_server, f"/v2/repository/models/{TINY}/load", '{"parameters": {"config": 5}}', "not supported")
    no_tracebacks(caplog)


@pytest.mark.parametrize("timeout", ["NaN", "Infinity", "-Infinity", "1e999", "0", "-5", "-0.5", '"100"', "true"])
def test_rest_timeouts_that_are_not_positive_finite_numbers_are_refused(tiny_server, caplog, timeout: str) -> None:
    body = pixels_body(
        "[" + ",".join(["0.1"] * 3 * 224 * 224) + "]", shape="[1,3,224,224]", parameters=f'{{"timeout": {timeout}}}'
    )
    refused(tiny_server, INFER, body, "parameters.timeout")
    no_tracebacks(caplog)


def test_rest_huge_timeouts_are_served(tiny_server) -> None:
    for timeout in ("1e300", str(2**63 - 1), str(2**64 - 1), "5000000"):
        data = "[" + ",".join(["0.1"] * 3 * 224 * 224) + "]"
        status, answer = post(
            tiny_server, INFER, pixels_body(data, shape="[1,3,224,224]", parameters=f'{{"timeout": {timeout}}}')
        )
        assert status == 200, answer[:300]


def test_multipart_without_a_usable_boundary_is_400(tiny_server, caplog) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="config"\r\n\r\n{}\r\n--b--\r\n'
    for content_type in (
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=" + "x" * 100,
    ):
        refused(tiny_server, "/v1/jobs", body, "boundary", headers={"Content-Type": content_type})
    no_tracebacks(caplog)


# -- over gRPC ----------------------------------------------------------------------------------


def grpc_pixels(parameters: dict[str, pb.InferParameter]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=TINY)
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 224, 224])
    request.raw_input_contents.append(np.full((1, 3, 224, 224), 0.1, "<f4").tobytes())
    for key, parameter in parameters.items():
        request.parameters[key].CopyFrom(parameter)
    return request


BAD_GRPC_TIMEOUTS = [
    pb.InferParameter(double_param=float("nan")),
    pb.InferParameter(double_param=float("inf")),
    pb.InferParameter(double_param=-float("inf")),
    pb.InferParameter(double_param=-1.0),
    pb.InferParameter(double_param=0.0),
    pb.InferParameter(int64_param=-5),
    pb.InferParameter(int64_param=0),
    pb.InferParameter(string_param="100"),
    pb.InferParameter(bool_param=True),
]


def test_grpc_timeout_parameters_that_are_not_positive_finite_numbers_are_refused(tiny_server, caplog) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for parameter in BAD_GRPC_TIMEOUTS:
            with pytest.raises(grpc.RpcError) as raised:
                infer(grpc_pixels({"timeout": parameter}), timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, parameter
            assert "parameters.timeout" in raised.value.details()
        for parameter in (
            pb.InferParameter(double_param=1e300),
            pb.InferParameter(int64_param=2**63 - 1),
            pb.InferParameter(uint64_param=2**64 - 1),
            pb.InferParameter(int64_param=30_000_000),
        ):
            assert infer(grpc_pixels({"timeout": parameter}), timeout=30).model_name == TINY
        # A timeout too short for any work is honoured: the request expires before compute.
        with pytest.raises(grpc.RpcError) as raised:
            infer(grpc_pixels({"timeout": pb.InferParameter(int64_param=1)}), timeout=30)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    no_tracebacks(caplog)


# -- images that do not decode ------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def broken_images() -> dict[str, bytes]:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    return {
        "zero bytes": b"\x00" * 64,
        "random bytes": np.random.default_rng(7).bytes(4096),
        "text": b"hello, this is not an image",
        "truncated PNG": png[: len(png) // 2],
        "PNG header only": header,
        "PNG with a corrupt IDAT": header + _png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 40) + _png_chunk(b"IEND", b""),
        "JPEG header only": jpeg[:20],
        "truncated JPEG": jpeg[: len(jpeg) // 3],
        "GIF with no frame": b"GIF89a\x10\x00\x10\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff;",
        "BMP header only": b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<IiiHH", 40, 4, 4, 1, 24),
        "WebP header only": b"RIFF\x24\x00\x00\x00WEBPVP8 ",
    }


def _leaks(message: str) -> bool:
    return "0x" in message or "object at" in message or "<_io" in message


def test_undecodable_images_are_refused_without_python_reprs_on_both_ports(tiny_server, caplog) -> None:
    corpus = broken_images()
    with grpc.insecure_channel(tiny_server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for name, data in corpus.items():
            request = pb.ModelInferRequest(model_name=TINY)
            request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
            with pytest.raises(grpc.RpcError) as raised:
                infer(request, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "IMAGE element 0" in raised.value.details() and not _leaks(raised.value.details()), name
            body = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"content_type": "base64"},
                                           "data": [base64.b64encode(data).decode()]}]})  # fmt: skip
            message = refused(tiny_server, INFER, body, "IMAGE element 0")
            assert not _leaks(message), (name, message)
    no_tracebacks(caplog)


def test_pil_reason_drops_reprs_and_addresses() -> None:
    from service.inference.preprocess import pil_reason

    reason = pil_reason(OSError("cannot identify image file <_io.BytesIO object at 0x7f1e551c8850>"))
    assert reason == "cannot identify image file the image"
    assert "0x" not in pil_reason(ValueError("bad thing at 0xdeadbeef00"))
    assert pil_reason(OSError("")) == "OSError"


# -- multipart field names ----------------------------------------------------------------------


def test_the_html_standards_three_escapes_are_decoded_and_no_others() -> None:
    from aiohttp import BodyPartReader
    from multidict import CIMultiDict

    from service.transport.rest.vision_routes import field_name

    def name(raw: str) -> str:
        headers = CIMultiDict({"Content-Disposition": f'form-data; name="{raw}"'})
        return field_name(BodyPartReader(b"b", headers, None))  # type: ignore[arg-type]

    assert name("12%22 vinyl") == '12" vinyl'
    assert name("a%0Ab%0Dc") == "a\nb\rc"
    assert name("100%25 cotton") == "100%25 cotton"
    assert name("%2F%20%0a%22x") == '%2F%20%0a"x'
    assert name("plain") == "plain"


def test_a_job_uploaded_as_a_browser_sends_it_keeps_its_class_names(tiny_server) -> None:
    """The bytes Chromium sends for a form whose file inputs are named ``12" vinyl`` and ``100%25 cotton``
    (its FormData encodes ``"`` as ``%22``, and leaves ``%`` alone)."""
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
    config = json.dumps({"baseModel": TINY, "outputModel": "records", "epochs": 1})
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="config"\r\n\r\n{config}\r\n'.encode()]
    for index in range(4):
        name = "12%22 vinyl" if index % 2 else "100%25 cotton"
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (40 + 150 * (index % 2),) * 3).save(buffer, format="PNG")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{index}.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + buffer.getvalue()
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, answer = post(tiny_server, "/v1/jobs", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer[:400]
    assert sorted(json.loads(answer)["labels"]) == ["100%25 cotton", '12" vinyl']
