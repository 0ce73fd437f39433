#!/usr/bin/env python3
"""A fine-tuned head's held-out accuracy served in float32 and in bfloat16, in one run.

    .venv/bin/python -m bench.precision_heads                 # alexnet, linear head, digits
    .venv/bin/python -m bench.precision_heads --base resnet101 --train 600

Two ``vision-serve`` subprocesses share one model store and one ``--weights`` directory (a seeded
random build written here, as bench/precision.py does): A in
``--dtype float32``, B with ``--dtype bfloat16``. A head is trained once, on A, as every head is
(in float32, on A's float32 features), on the first ``--train`` of scikit-learn's 1,797
handwritten digits (8x8, upscaled to 64x64 RGB PNGs); B serves the very head from the store (its
poll), on its base model's bfloat16 backbone. Both then classify the held-out digits (the rest):
accuracy on each, how many images the two answer differently, and the job's own validation
accuracy. The figures and the command go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="alexnet", help="base model [default: alexnet]")
    p.add_argument("--head", default="linear", help="head kind [default: linear]")
    p.add_argument("--epochs", type=int, default=30, help="training epochs [default: 30]")
    p.add_argument("--train", type=int, default=1000, help="digits trained on; the rest are held out [default: 1000]")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "precision_heads.json",
                   help="JSON output [default: bench/results/precision_heads.json]")  # fmt: skip
    return p


def predictions(url: str, model: str, images: list[bytes]) -> list[str]:
    from vision_client import Client

    labels: list[str] = []
    with Client(url, timeout=600) as client:
        for start in range(0, len(images), 64):
            labels += [best[0].label for best in client.classify(images[start : start + 64], model=model, top_k=1)]
    return labels


def served(client: Any, model: str) -> bool:
    from vision_client import ModelNotFoundError

    try:
        return bool(client.ready(model))
    except ModelNotFoundError:  # not seen in the store yet
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from bench import servers, throughput
    from bench.machine import machine_info
    from bench.precision import served_precision
    from bench.records import write_document
    from service.models import WeightsSource, build_model, get_model_spec
    from tests.support.finetune_data import digits
    from vision_client import Client, FineTuneConfig, HeadConfig

    images, targets = digits()
    labels = [str(int(target)) for target in targets]
    train = list(zip(images[: args.train], labels[: args.train], strict=True))
    held_images, held_labels = images[args.train :], labels[args.train :]
    print(f"# load average {os.getloadavg()}; {len(train)} digits trained on, {len(held_images)} held out", flush=True)
    running: dict[str, servers.BenchServer] = {}
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vision-precision-heads-") as work:
        weights, store = Path(work) / "weights", Path(work) / "store"
        weights.mkdir()
        torch.save(build_model(get_model_spec(args.base), WeightsSource.parse("random")).state_dict(),
                   weights / f"{args.base}.pth")  # fmt: skip
        try:
            for dtype in ("float32", "bfloat16"):
                extra = f"--dtype {dtype} --model-store {store} --store-poll-seconds 1"
                options = throughput.resolve_args(
                    ["--models", args.base, "--weights", str(weights), "--server-args", extra]
                )
                running[dtype] = servers.start(options, args.base, "auto", dict(os.environ), Path(work) / dtype)
            trainer = running["float32"].target.url
            config = FineTuneConfig(
                base_model=args.base, output_model="digits", head=HeadConfig(args.head), epochs=args.epochs
            )
            started = time.monotonic()
            with Client(trainer, timeout=600) as client:
                result = client.fine_tune(config, train, timeout=1800)
            found["job"] = {
                "state": str(result.state),
                "validation_accuracy": result.metrics.validation_accuracy,
                "seconds": time.monotonic() - started,
            }
            print(f"# job: {found['job']}", flush=True)
            with Client(running["bfloat16"].target.url, timeout=10) as client:
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not served(client, "digits"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the bfloat16 server did not pick the head up from the store")
                    time.sleep(0.5)
            answers = {}
            for dtype, server in running.items():
                answers[dtype] = predictions(server.target.url, "digits", held_images)
                accuracy = float(np.mean([a == b for a, b in zip(answers[dtype], held_labels, strict=True)]))
                found[dtype] = {
                    "held_out_accuracy": accuracy,
                    **served_precision(server.target.url, "digits"),
                    "base": served_precision(server.target.url, args.base),
                }
                print(f"# served in {dtype}: {found[dtype]}", flush=True)
            found["answers_that_differ"] = sum(a != b for a, b in zip(*answers.values(), strict=True))
        finally:
            for server in running.values():
                server.process.stop()
    print(
        f"{args.base} + {args.head} head on digits, {len(held_images)} held out: accuracy float32 "
        f"{found['float32']['held_out_accuracy']:.4f}, bfloat16 {found['bfloat16']['held_out_accuracy']:.4f}; "
        f"{found['answers_that_differ']} answers differ; job validation accuracy "
        f"{found['job']['validation_accuracy']:.4f}",
        flush=True,
    )
    document = {
        "machine": machine_info(load_average_end=os.getloadavg()),
        "command": sys.argv,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "result": found,
    }
    write_document(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
