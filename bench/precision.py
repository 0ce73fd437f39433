#!/usr/bin/env python3
"""bfloat16 against float32, in one run on one machine: the service in bfloat16, the service in
float32 and raw OpenVINO in bfloat16 in this process, with the agreement of each with float32.

    .venv/bin/python -m bench.precision                      # alexnet,resnet101 x image,pixels x C=1,32
    .venv/bin/python -m bench.precision --models alexnet --concurrency 1 --seconds 4

Per model, two ``vision-serve`` subprocesses start (``bench/servers.py``, the options of
``bench/throughput.py``: ``--max-batch-size 32``, its runtime cache), both with ``--weights DIR``
of one seeded random build written by this script (so that the servers and the in-process
baselines hold the very same weights whatever the build does), one
with ``--dtype bfloat16`` and one with ``--dtype float32``, both ``--runtime auto`` unless
``--runtime`` says otherwise (auto: OpenVINO in bfloat16, ONNX Runtime in float32 on a CPU). Raw
is the model's exported network compiled by the server's own backend code for OpenVINO in
bfloat16 (``service/runtimes``), run in batches of ``min(C, 32)`` on this process's thread. Each
point is measured one after the other (``bench/load.py``, ``bench/raw.py``: the same windows and
closed-loop ``tritonclient.grpc`` clients as ``bench/throughput.py``).

Agreement, beside each: on the benchmark's 8 photographs (``bench/inputs.py``), the lowest cosine
and top-1 agreement of each one's logits (IMAGE requests, each photograph alone) against eager
torchvision in float32 with the same weights; and the server's own measurement at load
(``vision.v1.Models``' ``precision_agreement``, on ``service/engine/precision.py``'s sample images).
The table, the machine and the command go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("bfloat16", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="alexnet,resnet101", help="comma list [default: alexnet,resnet101]")
    p.add_argument("--modes", default="pixels,image", help="comma list of pixels, image [default: both]")
    p.add_argument("--concurrency", default="1,32", help="comma list of closed-loop clients [default: 1,32]")
    p.add_argument("--seconds", type=float, default=10.0, help="each measured window [default: 10]")
    p.add_argument("--warmup-seconds", type=float, default=2.0, help="before each window [default: 2]")
    p.add_argument("--runtime", default="auto", help="--runtime of both servers [default: auto]")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "precision.json",
                   help="JSON output [default: bench/results/precision.json]")  # fmt: skip
    return p


def agreement(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Lowest cosine and top-1 agreement of rows of logits against the reference's."""
    a, b = got.astype(np.float64), reference.astype(np.float64)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min_cosine": float(cosines.min()), "top1": float((a.argmax(1) == b.argmax(1)).mean())}


def served_logits(url: str, model: str, jpegs: list[bytes]) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    from bench.inputs import infer_input

    with grpcclient.InferenceServerClient(url) as client:
        rows = [
            client.infer(model, [infer_input(grpcclient, "image", np.array([jpeg], dtype=np.object_))]).as_numpy(
                "LOGITS"
            )[0]
            for jpeg in jpegs
        ]
    return np.stack(rows)


def served_precision(url: str, model: str) -> dict[str, Any]:
    import grpc

    from vision_client.protocol.stubs.vision.v1 import models_pb2, models_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        info = models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(name=model), timeout=10)
    measured = info.precision_agreement
    return {
        "precision": info.precision,
        "runtime": info.runtime,
        "at_load": None
        if not info.HasField("precision_agreement")
        else {"min_cosine": measured.min_cosine, "top1": measured.top1, "images": measured.images},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if any(mode not in ("pixels", "image") for mode in modes) or min(levels) < 1 or args.seconds <= 0:
        raise SystemExit("precision.py: error: modes are pixels and image, concurrency at least 1, --seconds above 0")
    import torch

    from bench import load, servers, throughput
    from bench.ab import pixels_of
    from bench.inputs import photographs, request_payloads
    from bench.machine import machine_info
    from bench.raw import RawModel, RawThread, RawWindow, load_raw_models, measure_raw
    from bench.records import write_document
    from service.engine.devices import native_precisions
    from service.engine.precision import measure, reference_logits, sample_batch
    from service.engine.runtime import ModelInstance
    from service.models import WeightsSource, build_model, get_model_spec
    from service.runtimes.select import BackendLoader, RuntimeOptions

    cpu = torch.device("cpu")
    native = "bfloat16" in native_precisions(cpu)
    print(f"# CPU bfloat16 native: {native} (flags avx512_bf16/amx_bf16); load average {os.getloadavg()}", flush=True)
    if not native:
        raise SystemExit("precision.py: this CPU has no native bfloat16; the servers would refuse --dtype bfloat16")
    jpegs = [data for _, data in photographs()]
    rows: list[dict[str, Any]] = []
    window = RawWindow(args.warmup_seconds, args.seconds, 3)
    raw_thread = RawThread(dedicated=True)
    weights_dir = tempfile.TemporaryDirectory(prefix="vision-precision-weights-")
    try:
        for model in models:
            spec = get_model_spec(model)
            net = build_model(spec, WeightsSource.parse("random")).eval()
            weights = Path(weights_dir.name)
            torch.save(net.state_dict(), weights / f"{model}.pth")
            options = throughput.resolve_args(["--models", model, "--weights", str(weights)])
            eager = load_raw_models(model, str(weights), cpu, ["eager"], cache_dir=options.runtime_cache,
                                    threads=0)["eager"]  # fmt: skip
            pixels = pixels_of(model, jpegs)
            reference = eager.forward(torch.stack(pixels))  # type: ignore[arg-type]
            loader = BackendLoader(spec, net, RuntimeOptions(runtime="openvino", cache_dir=options.runtime_cache))
            backend = raw_thread.call(loader.load, "openvino", cpu, torch.bfloat16)
            instance = ModelInstance(backend)
            raw = RawModel(model, "openvino-bfloat16", spec.transforms(), lambda b, i=instance: i.forward([b]))
            samples = sample_batch(spec)
            raw_agreement = {
                "photos": agreement(raw_thread.call(raw.forward, torch.stack(pixels)), reference),
                "at_load": vars(raw_thread.call(measure, backend, samples, reference_logits(spec, net, samples))),
            }
            running: dict[str, servers.BenchServer] = {}
            found: dict[str, dict[str, Any]] = {"raw": raw_agreement}
            try:
                with tempfile.TemporaryDirectory(prefix="vision-precision-") as logs:
                    for dtype in DTYPES:
                        started = throughput.resolve_args(
                            ["--models", model, "--weights", str(weights), "--server-args", f"--dtype {dtype}"]
                        )
                        server = servers.start(started, model, args.runtime, dict(os.environ), Path(logs) / dtype)
                        running[dtype] = server
                        found[dtype] = served_precision(server.target.url, model)
                        found[dtype]["photos"] = agreement(served_logits(server.target.url, model, jpegs), reference)
                        print(f"# {model} --dtype {dtype}: {found[dtype]}", flush=True)
                    print(f"# {model} raw openvino bfloat16: {raw_agreement}", flush=True)
                    for mode in modes:
                        payloads = request_payloads(mode, jpegs, pixels)
                        for concurrency in levels:
                            row: dict[str, Any] = {"model": model, "mode": mode, "concurrency": concurrency}
                            for dtype, server in running.items():
                                result = load.measure_service(server.target, model, mode, concurrency, payloads,
                                                              window_s=args.seconds, warmup_s=args.warmup_seconds,
                                                              client="threads")  # fmt: skip
                                row[f"service_{dtype}"] = result
                            pids = [s.target.pid for s in running.values()]
                            row["raw_openvino_bfloat16"] = raw_thread.call(
                                measure_raw, raw, mode, min(concurrency, 32), jpegs, pixels, window, pids, raw_thread
                            )
                            rows.append(row)
                            print(line(row, found), flush=True)
            finally:
                for server in running.values():
                    server.process.stop()
            rows.append({"model": model, "agreement": found})
    finally:
        raw_thread.close()
        weights_dir.cleanup()
    document = {
        "machine": machine_info(load_average_end=os.getloadavg()),
        "command": sys.argv,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    write_document(args.output, document)
    return 0


def line(row: dict[str, Any], found: dict[str, dict[str, Any]]) -> str:
    bf16, fp32, raw = row["service_bfloat16"], row["service_float32"], row["raw_openvino_bfloat16"]

    def agree(key: str) -> str:
        photos = found[key]["photos"]
        return f"cos {photos['min_cosine']:.4f} top1 {photos['top1']:.2f}"

    return (
        f"{row['model']:<10} {row['mode']:<6} C={row['concurrency']:<3} "
        f"service bf16 {bf16.images_per_s:7.1f} img/s ({found['bfloat16']['runtime']}; {agree('bfloat16')})  "
        f"service fp32 {fp32.images_per_s:7.1f} img/s ({found['float32']['runtime']}; {agree('float32')})  "
        f"raw openvino bf16 {raw.images_per_s:7.1f} img/s ({agree('raw')})  "
        f"bf16/fp32 {bf16.images_per_s / fp32.images_per_s:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
