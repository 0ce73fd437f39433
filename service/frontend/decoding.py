"""IMAGE inputs decoded in the front end, so that decoding spreads over every front end's cores
instead of waiting on the engine's.

A request whose input is IMAGE (in the message, not in shared memory) is checked as the engine
would check it, its images decoded with the model's exact preprocessing (``service.inference.preprocess``,
which the engine describes once per model: ``hop.Describe``) straight into the request's slot, and
the request goes to the engine as the same request with a PIXELS input in place of IMAGE:
serialized by hand, the header from protobuf and the pixels as one ``raw_input_contents`` field
written in place, so no image is copied after it is decoded. Anything else (PIXELS, shared memory,
a request the checks or a decoder refuse) goes as it came: the engine answers it, and counts it,
exactly as it would have.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np

from service.config import ServeConfig
from service.errors import RelayedError, VisionServeError
from service.frontend.engine_link import EngineLink, Slot
from service.inference import hop
from service.inference.preprocess import ImageDecoder, Preprocessing, decode_rows
from service.transport.codec import parse_infer_request, uses_shared_memory
from vision_client.protocol import PIXELS
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

_RAW_INPUT_CONTENTS = (7 << 3) | 2  # ModelInferRequest.raw_input_contents, length-delimited


@dataclass(frozen=True)
class _Model:
    decoder: ImageDecoder
    key: str  # hop.preprocessing_key of its preprocessing


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class FrontendDecoding:
    """Decodes IMAGE requests for the engine; one per front end."""

    def __init__(self, link: EngineLink, config: ServeConfig, pool: concurrent.futures.Executor) -> None:
        self._link = link
        self._max_images = config.request_images_limit
        self._max_pixels = config.max_image_pixels
        self._window = config.decode_thread_count
        self._pool = pool
        self._models: dict[str, _Model] = {}

    async def infer(
        self,
        request: pb.ModelInferRequest,
        timeout: float | None,
        *,
        local: bool,
        protocol: str,
        method: str,
        carrier: Mapping[str, str] | None,
    ) -> bytes:
        """The engine's serialized response to ``request``, its images decoded here where they can be."""
        received = time.time_ns()
        slot, length, key = await self._decoded(request)
        decoded = (received, time.time_ns())  # when decoding, if it was done, began and ended
        send = partial(
            self._link.send,
            timeout=timeout,
            local=local,
            protocol=protocol,
            method=method,
            carrier=carrier,
            received_ns=received,
        )
        if slot is not None:
            try:
                return await send(slot, length, preprocessing=key, decoded_ns=decoded)
            except RelayedError as exc:
                if exc.status != hop.STALE:
                    raise
                self._models.pop(request.model_name, None)  # replaced meanwhile: send it as it came
        return await self._link.infer(
            request.SerializeToString(),
            timeout,
            local=local,
            protocol=protocol,
            method=method,
            carrier=carrier,
            received_ns=received,
        )

    async def _decoded(self, request: pb.ModelInferRequest) -> tuple[Slot | None, int, str]:
        """The request with PIXELS decoded into a slot, its length and preprocessing key; (None, 0, "")
        for a request the engine should take as it is."""
        if uses_shared_memory(request) or not any(tensor.name == "IMAGE" for tensor in request.inputs):
            return None, 0, ""
        try:
            call = parse_infer_request(request, max_images=self._max_images)
        except VisionServeError:
            return None, 0, ""  # the engine refuses it in its words, and counts it
        if call.inputs.images is None:
            return None, 0, ""
        model = await self._model(request.model_name)
        if model is None:
            return None, 0, ""
        images = call.inputs.images
        # Every field of the request but its input and the input's bytes (not copied, however large).
        header = pb.ModelInferRequest(model_name=request.model_name, model_version=request.model_version, id=request.id)
        for key, value in request.parameters.items():
            header.parameters[key].CopyFrom(value)
        header.outputs.extend(request.outputs)
        channels, height, width = model.decoder.shape
        header.inputs.add(name=PIXELS, datatype="FP32", shape=[len(images), channels, height, width])
        head = header.SerializeToString()
        pixel_bytes = len(images) * channels * height * width * 4
        field = bytes([_RAW_INPUT_CONTENTS]) + _varint(pixel_bytes)
        length = len(head) + len(field) + pixel_bytes
        slot = self._link.reserve(length)
        try:
            slot.view[: len(head)] = head
            start = len(head) + len(field)
            slot.view[len(head) : start] = field
            pixels = np.frombuffer(slot.view, np.float32, len(images) * channels * height * width, start)
            rows = pixels.reshape(len(images), channels, height, width)
            await decode_rows(model.decoder, images, rows, self._pool, self._window)
        except VisionServeError:
            self._link.release(slot)
            return None, 0, ""  # a bad image: the engine refuses it with the same words, and counts it
        except BaseException:
            self._link.release(slot)
            raise
        return slot, length, model.key

    async def _model(self, name: str) -> _Model | None:
        known = self._models.get(name)
        if known is not None:
            return known
        try:
            description = await self._link.describe(name)
        except VisionServeError:
            return None  # an unknown model, or the engine away: the engine's answer says which
        preprocessing = Preprocessing.from_dict(json.loads(description))
        model = _Model(ImageDecoder(preprocessing, max_pixels=self._max_pixels), hop.preprocessing_key(preprocessing))
        self._models[name] = model
        return model
