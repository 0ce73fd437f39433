"""Triton's ``ModelStreamInfer``: the stream's requests run as they arrive, answered in completion
order, with at most a bounded number in flight. One implementation for every process that serves
the protocol; what runs one request is the caller's (``infer``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from service.transport.call import Call
from service.transport.errors import status_for
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb


async def stream_call(
    requests: AsyncIterator[pb.ModelInferRequest],
    call: Call,
    infer: Callable[..., Awaitable[pb.ModelInferResponse]],
    *,
    max_in_flight: int,
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """A ``ModelStreamInfer`` call: each request run by ``infer`` (a servicer's ``infer``) with the
    call's deadline, locality and trace context (each request's parent), as :func:`stream_infer`
    orders them."""

    async def one(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return await infer(request, call, method="ModelStreamInfer")

    async for response in stream_infer(requests, one, max_in_flight):
        yield response


async def stream_infer(
    requests: AsyncIterator[pb.ModelInferRequest],
    infer: Callable[[pb.ModelInferRequest], Awaitable[pb.ModelInferResponse]],
    max_in_flight: int,
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Run each streamed request as it arrives; answer in completion order, with its id.

    At most ``max_in_flight`` requests of a stream are being worked on or waiting to be sent back;
    while that many are, the stream is not read further, so a client that sends faster than it is
    answered (or stops reading) meets gRPC flow control instead of growing the server's queues.
    A request that fails is answered with its error message in the stream; the stream goes on.
    """
    slots = asyncio.Semaphore(max_in_flight)
    # Each response holds a slot until it is sent: the queue never holds more than the bound.
    responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()

    async def answer(request: pb.ModelInferRequest) -> None:
        try:
            result = await infer(request)
            responses.put_nowait(pb.ModelStreamInferResponse(infer_response=result))
        except Exception as exc:
            _, message = status_for(exc)
            failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            responses.put_nowait(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))

    async def read() -> None:
        try:
            while True:
                await slots.acquire()
                try:
                    request = await requests.__anext__()
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            responses.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (response := await responses.get()) is not None:
            yield response
            slots.release()
        await reader  # re-raise what ended the request stream, if anything
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
