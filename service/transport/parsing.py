"""Bounded parsing of inference requests: the wire bytes are screened before protobuf builds them.

gRPC parses a request on the event loop's thread, and protobuf's parser holds the
GIL throughout (in any thread): a 60 MB ``ModelInferRequest`` made of 30 million
empty ``bytes_contents`` elements takes seconds to parse and grows the process by
a gigabyte, while health checks and ``ServerLive`` wait. So for the methods named
here gRPC hands over the bytes, and :func:`screen` first walks the message's wire
format, skipping every field by its length and counting fields. A request holds a
few fields besides its images (at most ``--max-request-images`` of them), so a
message with more fields than that is refused after a walk over at most that
many, whatever its size; only then is it parsed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.errors import InvalidInputError
from service.transport.handlers import (
    AioContext,
    HandlerInterceptor,
    Req,
    Resp,
    StreamBehavior,
    UnaryBehavior,
    behaviors,
    replace,
    responses,
)
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

Parser = Callable[[bytes], Any]
Schema = Mapping[int, "Schema"]  # field number -> schema of the sub-message to look into

# ModelInferRequest: inputs (5) -> InferInputTensor: contents (5) -> InferTensorContents,
# whose bytes_contents are the images; outputs (6) -> their parameters. Everything else is
# skipped by its length (raw_input_contents too, however large).
INFER_REQUEST_SCHEMA: Schema = {5: {5: {}}, 6: {}}
FIELDS_BESIDES_IMAGES = 256  # names, shapes, parameters, outputs...: generous for any real request


class ScreenedParsingInterceptor(HandlerInterceptor):
    """Screens, then parses, the requests of ``methods`` (full method name -> parser).

    ``max_fields``: the most wire fields a request may hold in all (see :func:`screen`).
    """

    def __init__(self, methods: Mapping[str, Parser], *, schema: Schema, max_fields: int) -> None:
        self._methods = dict(methods)
        self._schema = schema
        self._max_fields = max_fields
        # method -> (the handler it was given, the wrapped one): a method's handler is the same object
        # call after call, so it is wrapped once, not once per call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def wrap(
        self, handler: grpc.RpcMethodHandler[Req, Resp], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Req, Resp]:
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            wrapped: grpc.RpcMethodHandler[Req, Resp] = known[1]
            return wrapped
        parser = self._methods.get(details.method)
        if parser is None:
            return handler
        wrapped = self._wrap(handler, ScreenedParser(parser, self._schema, self._max_fields))
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler[Req, Resp], parse: ScreenedParser) -> grpc.RpcMethodHandler[Req, Resp]:
        behavior = behaviors(handler)
        if behavior.unary_unary:
            return replace(handler, drop_request_deserializer=True, unary_unary=_unary(behavior.unary_unary, parse))
        if behavior.stream_stream:
            return replace(
                handler, drop_request_deserializer=True, stream_stream=_streaming(behavior.stream_stream, parse)
            )
        return handler


class ScreenedParser:
    """``parser`` behind :func:`screen`; protobuf's own errors become :class:`InvalidInputError`."""

    def __init__(self, parser: Parser, schema: Schema, max_fields: int) -> None:
        self._parser = parser
        self._schema = schema
        self._max_fields = max_fields

    def __call__(self, data: bytes) -> Any:
        screen(data, self._schema, self._max_fields)
        try:
            return self._parser(data)
        except DecodeError as exc:
            raise InvalidInputError(
                f"the request ({len(data)} bytes) is not a valid protobuf message of this method: {exc}"
            ) from exc


def screen(data: bytes, schema: Schema, max_fields: int) -> None:
    """Refuse ``data`` if it holds more than ``max_fields`` fields, looking into ``schema``'s sub-messages.

    Costs at most ``max_fields`` field headers, whatever the size of ``data``. Malformed wire
    data found on the way is refused too (the parser would refuse it later anyway).
    """
    budget = [max_fields]
    _walk(memoryview(data), 0, len(data), schema, budget, max_fields)


def _walk(buf: memoryview, pos: int, end: int, schema: Schema, budget: list[int], max_fields: int) -> None:
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise InvalidInputError(
                f"the request holds more than {max_fields} protobuf fields (IMAGE elements, inputs, outputs, "
                "parameters); a request may carry at most as many images as --max-request-images allows: "
                "split it into smaller requests"
            )
        key, pos = _varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _malformed(f"field {field} says {length} bytes but {end - pos} remain")
            child = schema.get(field)
            if child is not None:
                _walk(buf, pos, pos + length, child, budget, max_fields)
            pos += length
        else:
            raise _malformed(f"field {field} has wire type {wire_type}, which this message does not use")
    if pos > end:
        raise _malformed("the last field runs past the end of its message")


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _malformed("a varint is truncated or longer than 10 bytes")


def _malformed(detail: str) -> InvalidInputError:
    return InvalidInputError(f"the request is not a valid protobuf message of this method: {detail}")


def _unary(behavior: UnaryBehavior, parse: ScreenedParser) -> UnaryBehavior:
    async def wrapper(data: bytes, context: AioContext) -> Any:
        return await behavior(parse(data), context)

    return wrapper


def _streaming(behavior: StreamBehavior, parse: ScreenedParser) -> StreamBehavior:
    async def parsed(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for data in requests:
            yield parse(data)

    async def wrapper(requests: AsyncIterator[bytes], context: AioContext) -> AsyncIterator[Any]:
        async for response in responses(behavior, parsed(requests), context):
            yield response

    return wrapper


def inference_parsing_interceptor(max_request_images: int) -> ScreenedParsingInterceptor:
    """Screens inference requests' wire bytes before parsing them (see :mod:`service.transport.parsing`)."""
    service_name = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    return ScreenedParsingInterceptor(
        {
            f"/{service_name}/ModelInfer": pb.ModelInferRequest.FromString,
            f"/{service_name}/ModelStreamInfer": pb.ModelInferRequest.FromString,
        },
        schema=INFER_REQUEST_SCHEMA,
        max_fields=max_request_images + FIELDS_BESIDES_IMAGES,
    )
