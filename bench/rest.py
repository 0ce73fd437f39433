"""REST against gRPC on one server, in one run: images/s and latency per protocol and concurrency.

One ``vision-serve`` child process serves AlexNet (seeded random weights: speed does not depend
on them). For each input (IMAGE: real JPEGs; PIXELS: preprocessed [1,3,224,224] float32) and
concurrency C, C closed-loop client threads send single-image requests for ``--seconds``:

- ``grpc``: ``tritonclient.grpc``, raw tensors, as the other benchmarks;
- ``http-binary``: Triton's binary tensor data extension (what ``tritonclient.http`` sends),
  one keep-alive ``http.client`` connection per thread, the body built once per input;
- ``http-json``: KServe v2 JSON (PIXELS as a list of numbers, IMAGE base64 with
  ``content_type: base64``), the body built once per input.

Clients are lean on purpose (request bodies built ahead, responses parsed only for their status
and size), so that the figures are the server's. Prints a table and writes JSON.

    .venv/bin/python -m bench.rest --seconds 8 --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.inputs import photographs
from bench.machine import machine_info
from tests.support.servers import start_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "alexnet"


def http_bodies(mode: str, jpegs: list[bytes], pixels: list[np.ndarray]) -> dict[str, list[tuple[bytes, dict]]]:
    """Each input's request body and headers, binary and JSON."""
    binary, as_json = [], []
    outputs = [{"name": "LOGITS", "parameters": {"binary_data": True}}]
    if mode == "image":
        for jpeg in jpegs:
            element = len(jpeg).to_bytes(4, "little") + jpeg
            head = json.dumps(
                {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                             "parameters": {"binary_data_size": len(element)}}], "outputs": outputs}
            ).encode()  # fmt: skip
            binary.append((head + element, {"Inference-Header-Content-Length": str(len(head))}))
            body = {
                "inputs": [
                    {
                        "name": "IMAGE",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(jpeg).decode()],
                    }
                ]
            }
            as_json.append((json.dumps(body).encode(), {"Content-Type": "application/json"}))  # fmt: skip
    else:
        for tensor in pixels:
            raw = tensor.tobytes()
            head = json.dumps(
                {"inputs": [{"name": "PIXELS", "shape": list(tensor.shape), "datatype": "FP32",
                             "parameters": {"binary_data_size": len(raw)}}], "outputs": outputs}
            ).encode()  # fmt: skip
            binary.append((head + raw, {"Inference-Header-Content-Length": str(len(head))}))
            body = {
                "inputs": [
                    {"name": "PIXELS", "shape": list(tensor.shape), "datatype": "FP32", "data": tensor.ravel().tolist()}
                ]
            }
            as_json.append((json.dumps(body).encode(), {"Content-Type": "application/json"}))  # fmt: skip
    return {"http-binary": binary, "http-json": as_json}


def run_point(protocol: str, server: Any, payloads: list[Any], concurrency: int, seconds: float) -> dict[str, Any]:
    """C threads for ``seconds`` after a warm-up; images/s and latency percentiles."""
    spans: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    start = threading.Barrier(concurrency + 1)
    stop_at = [float("inf")]
    measure_from = [float("inf")]

    def client(index: int) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as triton

            connection: Any = triton.InferenceServerClient(server.target)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
        start.wait()
        sent = 0
        while True:
            began = time.perf_counter()
            if began >= stop_at[0]:
                break
            payload = payloads[(index + sent) % len(payloads)]
            sent += 1
            try:
                if protocol == "grpc":
                    connection.infer(MODEL, [payload]).as_numpy("LOGITS")
                else:
                    body, headers = payload
                    connection.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
                    response = connection.getresponse()
                    answer = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{response.status}: {answer[:200]!r}")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if began >= measure_from[0]:
                spans[index].append(time.perf_counter() - began)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    now = time.perf_counter()
    measure_from[0] = now + min(3.0, seconds / 2)  # warm-up: connections, first batches
    stop_at[0] = measure_from[0] + seconds
    for thread in threads:
        thread.join()
    latencies = sorted(s for client_spans in spans for s in client_spans)
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "images_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per point")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--modes", default="image,pixels")
    parser.add_argument("--protocols", default="grpc,http-binary,http-json")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "rest.json")
    args = parser.parse_args(argv)
    import tritonclient.grpc as triton
    from torchvision.models import AlexNet_Weights

    jpegs = [jpeg for _, jpeg in photographs()]
    transform = AlexNet_Weights.DEFAULT.transforms()
    import io

    from PIL import Image

    pixels = [transform(Image.open(io.BytesIO(j)).convert("RGB")).unsqueeze(0).numpy() for j in jpegs]
    workdir = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    server = start_server(workdir, "--models", MODEL, "--weights", "random", "--model-store", "none")
    results: list[dict[str, Any]] = []
    try:
        server.wait_serving("", timeout=1800)
        assert server.http_port is not None
        for mode in args.modes.split(","):
            grpc_payloads = []
            for jpeg, tensor in zip(jpegs, pixels, strict=True):
                if mode == "image":
                    item = triton.InferInput("IMAGE", [1], "BYTES")
                    item.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
                else:
                    item = triton.InferInput("PIXELS", list(tensor.shape), "FP32")
                    item.set_data_from_numpy(tensor)
                grpc_payloads.append(item)
            payloads: dict[str, list[Any]] = {"grpc": grpc_payloads, **http_bodies(mode, jpegs, pixels)}
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for protocol, items in payloads.items():
                    if protocol not in args.protocols.split(","):
                        continue
                    point = {"mode": mode, **run_point(protocol, server, items, concurrency, args.seconds)}
                    results.append(point)
                    print(
                        f"{mode:7} C={concurrency:<3} {protocol:12} {point['images_per_s']:8.1f} img/s  "
                        f"p50 {point['p50_ms']} ms  p99 {point['p99_ms']} ms  errors {point['errors']}",
                        flush=True,
                    )
    finally:
        server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"machine": machine_info(), "seconds": args.seconds, "points": results}, indent=1)
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
