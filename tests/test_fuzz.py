"""Fuzzing the request codec and the image decoder: only our own errors may come out.

Structure-aware: requests are protobuf messages built from fuzzed fields (names, datatypes,
shapes, contents, raw tensors, output parameters), images are valid files of every format
and mode with bytes flipped, cut or inserted. The suite runs a short, derandomized pass;
``make fuzz`` runs a long random one (``FUZZ_EXAMPLES`` examples per target).
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.models import AlexNet_Weights

from service.errors import VisionServeError
from service.inference.preprocess import ImageDecoder
from service.models.preprocessing import preprocessing_of
from service.transport.codec import InferCall, parse_infer_request
from service.transport.parsing import FIELDS_BESIDES_IMAGES, INFER_REQUEST_SCHEMA, ScreenedParser, screen
from vision_client.protocol import encode_bytes_elements
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

LONG_RUN = "FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
MAX_IMAGES = 8
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,  # the suite's pass is the same every time: never flaky
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _image(mode: str, fmt: str, size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(len(mode) * 31 + len(fmt))
    picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        picture = Image.fromarray(np.asarray(picture.convert("L")).astype(np.uint16) * 257)
    else:
        picture = picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [
    _image(mode, fmt)
    for mode, fmt in [
        ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
        ("1", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("RGB", "WEBP"), ("RGBA", "WEBP"), ("P", "GIF"),
        ("RGB", "BMP"), ("1", "BMP"), ("RGB", "TIFF"),
    ]
]  # fmt: skip


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image of some format and mode, then flipped, cut, inserted or patched bytes."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "patch-int"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:  # a width, height, length or count field set to an extreme value
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[at : at + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
    return bytes(data)


images = st.one_of(mutated_images(), st.binary(max_size=64), st.sampled_from(SEEDS))
dims = st.one_of(st.integers(-2, 6), st.sampled_from([0, 224, 2**31, 2**62, -(2**63), 2**63 - 1]))


@st.composite
def tensors(draw: st.DrawFn) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    name = draw(st.sampled_from(["IMAGE", "PIXELS", "", "LOGITS"]) | st.text(max_size=8))
    datatype = draw(st.sampled_from(["BYTES", "FP32", "INT8", "FP16", ""]) | st.text(max_size=6))
    shape = draw(st.lists(dims, max_size=5))
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    which = draw(st.sampled_from(["bytes", "fp32", "int", "mixed", "none"]))
    if which == "bytes":
        tensor.contents.bytes_contents.extend(draw(st.lists(images, max_size=4)))
    elif which == "fp32":
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
    elif which == "int":
        tensor.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)))
    elif which == "mixed":
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), min_size=1, max_size=8)))
        tensor.contents.bytes_contents.append(draw(st.binary(max_size=8)))
    raw_kind = draw(st.sampled_from(["none", "elements", "floats", "bytes"]))
    raw: bytes | None = None
    if raw_kind == "elements":
        raw = encode_bytes_elements(draw(st.lists(images, max_size=4)))
        if draw(st.booleans()):  # a damaged length prefix or tail
            raw = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=6))
    elif raw_kind == "floats":
        count = draw(st.integers(0, 3 * 8 * 8 * 2))
        raw = np.random.default_rng(count).standard_normal(count).astype("<f4").tobytes()
    elif raw_kind == "bytes":
        raw = draw(st.binary(max_size=64))
    return tensor, raw


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["alexnet", ""]) | st.text(max_size=12)),
        model_version=draw(st.sampled_from(["", "1", "2"]) | st.text(max_size=4)),
        id=draw(st.text(max_size=8)),
    )
    for tensor, raw in draw(st.lists(tensors(), max_size=3)):
        request.inputs.append(tensor)
        if raw is not None:
            request.raw_input_contents.append(raw)
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["LOGITS", "OTHER", ""])))
        kind = draw(st.sampled_from(["none", "int64", "string", "bool", "double", "uint64"]))
        parameter = output.parameters["classification"] if kind != "none" else None
        if kind == "int64":
            parameter.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "string":
            parameter.string_param = draw(st.sampled_from(["3", "0", "-1", "x", "99999999999999999999", "٣"]))
        elif kind == "bool":
            parameter.bool_param = draw(st.booleans())
        elif kind == "double":
            parameter.double_param = draw(st.floats())
        elif kind == "uint64":
            parameter.uint64_param = draw(st.integers(0, 2**64 - 1))
    return request


def check_call(call: InferCall) -> None:
    """What a request that passes the codec promises the data plane."""
    inputs = call.inputs
    assert (inputs.images is None) != (inputs.pixels is None)
    if inputs.images is not None:
        assert 1 <= len(inputs.images) <= MAX_IMAGES and all(inputs.images)
    else:
        assert inputs.pixels is not None and inputs.pixels.ndim == 4 and inputs.pixels.dtype == np.float32
        assert 1 <= inputs.pixels.shape[0] <= MAX_IMAGES
    assert call.classification is None or call.classification >= 1


@FUZZ
@given(requests())
def test_codec_raises_only_our_errors(request: pb.ModelInferRequest) -> None:
    for message in (request, pb.ModelInferRequest.FromString(request.SerializeToString())):
        try:
            call = parse_infer_request(message, max_images=MAX_IMAGES)
        except VisionServeError:
            continue
        check_call(call)


@FUZZ
@given(st.binary(max_size=512) | requests().map(lambda r: r.SerializeToString()), st.data())
def test_screened_parsing_of_damaged_wire_bytes(data: bytes, draw: st.DataObject) -> None:
    """What the server does with a request's bytes: screen, parse, then the codec."""
    damaged = bytearray(data)
    for _ in range(draw.draw(st.integers(0, 4))):
        if damaged:
            damaged[draw.draw(st.integers(0, len(damaged) - 1))] = draw.draw(st.integers(0, 255))
    max_fields = draw.draw(st.sampled_from([4, MAX_IMAGES + FIELDS_BESIDES_IMAGES]))
    try:
        message = PARSE[max_fields](bytes(damaged))
        check_call(parse_infer_request(message, max_images=MAX_IMAGES))
    except VisionServeError:
        pass


def test_screening_never_refuses_a_request_within_the_limits() -> None:
    """Every request the fuzzer builds with few images passes screening with the server's budget."""

    @FUZZ
    @given(requests())
    def check(request: pb.ModelInferRequest) -> None:
        images = sum(len(t.contents.bytes_contents) for t in request.inputs)
        if images <= MAX_IMAGES:
            screen(request.SerializeToString(), INFER_REQUEST_SCHEMA, MAX_IMAGES + FIELDS_BESIDES_IMAGES)

    check()


PARSE = {
    fields: ScreenedParser(pb.ModelInferRequest.FromString, INFER_REQUEST_SCHEMA, fields)
    for fields in (4, MAX_IMAGES + FIELDS_BESIDES_IMAGES)
}


DECODER = ImageDecoder(preprocessing_of(AlexNet_Weights.DEFAULT.transforms()), max_pixels=1_000_000)


@FUZZ
@given(images)
def test_decoder_raises_only_our_errors(data: bytes) -> None:
    try:
        tensor = DECODER(data)
    except VisionServeError:
        return
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all()
