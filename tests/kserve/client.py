"""KServe's own gRPC client against our server; run with the python of .venv-kserve.

    .venv-kserve/bin/python tests/kserve/client.py TARGET MODEL IMAGE.jpg PIXELS.npy OUT.npz

Checks liveness and readiness, then infers with IMAGE and PIXELS, each sent raw
(``raw_input_contents``) and typed (``contents``), and saves the four LOGITS to OUT.npz
for the test to compare with tritonclient's. Prints what it did as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(target: str, model: str, image_path: Path, pixels_path: Path, out: Path) -> None:
    image = image_path.read_bytes()
    pixels = np.load(pixels_path).astype(np.float32)
    async with InferenceGRPCClient(url=target, timeout=120) as client:
        report = {
            "server_live": await client.is_server_live(),
            "server_ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(model),
        }

        raw_image = InferInput("IMAGE", [1], "BYTES")
        raw_image.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
        typed_image = InferInput("IMAGE", [1], "BYTES", data=[image])
        raw_pixels = InferInput("PIXELS", list(pixels.shape), "FP32")
        raw_pixels.set_data_from_numpy(pixels, binary_data=True)
        typed_pixels = InferInput("PIXELS", list(pixels.shape), "FP32", data=pixels.ravel().tolist())

        logits = {}
        for name, tensor in (
            ("image_raw", raw_image),
            ("image_typed", typed_image),
            ("pixels_raw", raw_pixels),
            ("pixels_typed", typed_pixels),
        ):
            request = InferRequest(model_name=model, infer_inputs=[tensor], request_id=name)
            grpc_request = request.to_grpc()
            report[f"{name}_sent_raw"] = bool(grpc_request.raw_input_contents)
            response = await client.infer(request)
            output = response.outputs[0]
            report[f"{name}_output"] = [output.name, output.datatype, list(output.shape), response.id]
            logits[name] = output.as_numpy()
    np.savez(out, **logits)
    print(json.dumps(report))


if __name__ == "__main__":
    target, model, image_path, pixels_path, out = sys.argv[1:6]
    asyncio.run(main(target, model, Path(image_path), Path(pixels_path), Path(out)))
