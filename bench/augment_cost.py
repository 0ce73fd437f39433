#!/usr/bin/env python3
"""What augmentation costs a fine-tuning job on a frozen backbone, in one run.

    .venv/bin/python -m bench.augment_cost                       # alexnet, 500 digits, views 0, 2, 4
    .venv/bin/python -m bench.augment_cost --examples 1797 --views 0 1 2 4 8

One ``vision-serve`` subprocess (``--weights random``: a seeded random backbone, no download)
runs the same job once per ``--views`` setting, one after the other, on the first ``--examples``
of scikit-learn's 1,797 handwritten digits (8x8, upscaled to 64x64 RGB PNGs, as the tests use):
a linear head, Adam, ``--epochs`` epochs, random resized crop and horizontal flip. With V views
the backbone computes the features of 1 + V images per example (the views as PIXELS through the
same batched path), once, before training; training then draws one view per example and step.
Each run reports the job's time from start to end, its head training's part, the features' part
(the rest: extraction and publishing), the time per backbone image, and the validation accuracy.
The figures and the command go to ``--output`` as JSON (bench/records.py).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.records import write_document

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300.0


@dataclass
class AugmentRun:
    """One job of the run: its views and what it took."""

    views: int
    examples: int
    backbone_images: int  # examples x (1 + views): images the frozen backbone ran
    job_seconds: float  # started to finished, as the server records it
    train_seconds: float  # the head's training (the trainer's own clock)
    features_and_publish_seconds: float  # the rest: feature extraction, mostly
    ms_per_backbone_image: float  # features_and_publish_seconds per backbone image
    job_seconds_vs_no_views: float  # job_seconds / the views=0 job's
    validation_accuracy: float
    validation_examples: int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="alexnet", help="base model [default: alexnet]")
    p.add_argument("--examples", type=int, default=500, help="digits in each job [default: 500]")
    p.add_argument("--views", type=int, nargs="+", default=[0, 2, 4], help="views per example [default: 0 2 4]")
    p.add_argument("--epochs", type=int, default=10, help="training epochs [default: 10]")
    p.add_argument("--device", default="cpu", help="the server's --device [default: cpu]")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "augment_cost.json",
                   help="JSON output [default: bench/results/augment_cost.json]")  # fmt: skip
    return p


def digits(count: int) -> tuple[list[bytes], list[str]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = []
    for pixels in data.images[:count]:
        image = Image.fromarray((pixels * 16).clip(0, 255).astype(np.uint8)).resize((64, 64), Image.BILINEAR)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images, [str(int(label)) for label in data.target[:count]]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tests.support.servers import start_server
    from vision_client import AugmentationConfig, Client, FineTuneConfig

    load_before = os.getloadavg()
    images, labels = digits(args.examples)
    examples = list(zip(images, labels, strict=True))
    runs: list[AugmentRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as work:
        server = start_server(Path(work), "--models", args.base, "--weights", "random", "--device", args.device)
        try:
            server.wait_serving(args.base, timeout=READY_TIMEOUT_S)
            with Client(server.target, timeout=60) as client:
                for views in args.views:
                    config = FineTuneConfig(
                        args.base,
                        f"digits-views-{views}",
                        epochs=args.epochs,
                        augmentation=AugmentationConfig(views=views),
                        replace=True,
                    )
                    began = time.monotonic()
                    result = client.fine_tune(config, examples)
                    if not result.succeeded:
                        print(f"views={views}: the job {result.state}: {result.job.error}", file=sys.stderr)
                        return 1
                    job = result.job
                    assert job.started_at is not None and job.finished_at is not None
                    seconds = job.finished_at - job.started_at
                    rest = seconds - job.metrics.train_seconds
                    backbone = args.examples * (1 + views)
                    runs.append(
                        AugmentRun(
                            views=views,
                            examples=args.examples,
                            backbone_images=backbone,
                            job_seconds=round(seconds, 2),
                            train_seconds=round(job.metrics.train_seconds, 2),
                            features_and_publish_seconds=round(rest, 2),
                            ms_per_backbone_image=round(1000 * rest / backbone, 2),
                            job_seconds_vs_no_views=round(seconds / runs[0].job_seconds, 2) if runs else 1.0,
                            validation_accuracy=round(job.metrics.validation_accuracy, 4),
                            validation_examples=job.metrics.validation_examples,
                        )
                    )
                    print(
                        f"views={views}: job {seconds:.1f} s (train {job.metrics.train_seconds:.1f} s, features and "
                        f"publish {rest:.1f} s, {1000 * rest / backbone:.1f} ms per backbone image), "
                        f"validation accuracy {job.metrics.validation_accuracy:.3f} "
                        f"[{time.monotonic() - began:.1f} s with the upload]",
                        flush=True,
                    )
        finally:
            server.stop()
    document = {
        "command": "python -m bench.augment_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base_model": args.base,
        "weights": "random",
        "device": args.device,
        "epochs": args.epochs,
        "load_average_before": [round(x, 2) for x in load_before],  # the machine's other work: noisy if high
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    write_document(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
