"""KServe's own REST client against our HTTP port; run with the python of .venv-kserve.

    .venv-kserve/bin/python tests/kserve/rest_client.py BASE_URL MODEL IMAGE.jpg PIXELS.npy OUT.npz

Checks liveness and readiness, then infers with IMAGE as binary data, and PIXELS as binary data and
as JSON, and saves the three LOGITS to OUT.npz for the test to compare with tritonclient's. Prints
what it did as JSON. (KServe's REST client cannot send encoded images as JSON: its JSON encoder
refuses bytes; text BYTES go as UTF-8 strings, which the server takes as they are.)
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(base_url: str, model: str, image_path: Path, pixels_path: Path, out: Path) -> None:
    image = image_path.read_bytes()
    pixels = np.load(pixels_path).astype(np.float32)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    try:
        report = {
            "server_live": await client.is_server_live(base_url),
            "server_ready": await client.is_server_ready(base_url),
            "model_ready": await client.is_model_ready(base_url, model),
        }
        binary_image = InferInput("IMAGE", [1], "BYTES")
        binary_image.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
        binary_pixels = InferInput("PIXELS", list(pixels.shape), "FP32")
        binary_pixels.set_data_from_numpy(pixels, binary_data=True)
        json_pixels = InferInput("PIXELS", list(pixels.shape), "FP32", data=pixels.ravel().tolist())
        logits = {}
        for name, tensor in (
            ("image_binary", binary_image),
            ("pixels_binary", binary_pixels),
            ("pixels_json", json_pixels),
        ):
            request = InferRequest(model_name=model, infer_inputs=[tensor], request_id=name)
            response = await client.infer(base_url, request, model_name=model)
            output = response.outputs[0]
            report[f"{name}_output"] = [output.name, output.datatype, list(output.shape), response.id]
            logits[name] = output.as_numpy()
    finally:
        await client.close()
    np.savez(out, **logits)
    print(json.dumps(report))


if __name__ == "__main__":
    base_url, model, image_path, pixels_path, out = sys.argv[1:6]
    asyncio.run(main(base_url, model, Path(image_path), Path(pixels_path), Path(out)))
