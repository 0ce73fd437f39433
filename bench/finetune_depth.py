#!/usr/bin/env python3
"""How deep to fine-tune: a frozen backbone's heads against training its last blocks, in one run.

    .venv/bin/python -m bench.finetune_depth                        # alexnet, 500 digits trained on
    .venv/bin/python -m bench.finetune_depth --train 300 --epochs 30 --views 2

One ``vision-serve`` subprocess (``--weights random``: a seeded random backbone, no download) runs
one job per setting, one after the other, on ``--train`` of scikit-learn's 1,797 handwritten
digits (8x8, upscaled to 64x64 RGB PNGs, as the tests use; ``--split``: drawn from a seeded
shuffle, or the first ones, whose writers the held-out digits mostly do not share); each new
model then classifies the other digits, held out, through the server (the served network: for trained
blocks, the whole new network in the server's runtime). The settings:

- ``frozen, linear``: today's default, a linear head on the frozen backbone's features;
- ``frozen, layers``: a layer list with normalisation and dropout
  (``linear:256,batch_norm,relu,dropout:0.25``) on the same features;
- ``k=1`` and ``k=2``: ``train_backbone_blocks`` 1 and 2 (AlexNet: ``fc7``, then ``fc6`` too) with
  a linear head, the blocks at ``--backbone-lr-factor`` times the head's learning rate;
- with ``--views V``, also ``k=1`` with V augmented views per example: what augmentation costs when
  the views' activations, not features, are computed and kept.

Each row: held-out accuracy, the job's validation accuracy, the job's time (start to end, as the
server records it) and its training's part (the trainer's clock). The figures and the command go to
``--output`` as JSON (bench/records.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.records import write_document
from tests.support.finetune_data import digits, shuffled_digits

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300.0
LAYERS = "linear:256,batch_norm,relu,dropout:0.25"


@dataclass
class DepthRun:
    """One job of the run and what its model does on the held-out digits."""

    setting: str
    train_backbone_blocks: int
    head: str
    views: int
    held_out_accuracy: float
    held_out_examples: int
    validation_accuracy: float
    best_epoch: int
    job_seconds: float  # started to finished, as the server records it
    train_seconds: float  # the trainer's own clock: training (and statistics, validation, refit)
    extraction_and_publish_seconds: float  # the rest: the backbone's part, mostly, and the export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="alexnet", help="base model [default: alexnet]")
    p.add_argument("--train", type=int, default=500, help="digits trained on; the rest are held out [default: 500]")
    p.add_argument("--epochs", type=int, default=10, help="training epochs [default: 10]")
    p.add_argument("--split", choices=("shuffled", "ordered"), default="shuffled",
                   help="shuffled: trained on and held-out digits drawn from one seeded shuffle (the same writers); "
                   "ordered: the first --train trained on, the rest held out (others of the 43 writers, mostly) "
                   "[default: shuffled]")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-3, help="the head's learning rate (Adam) [default: 0.001]")
    p.add_argument("--backbone-lr-factor", type=float, default=0.01,
                   help="the trained blocks' lr as a factor of --lr [default: 0.01, the config's]")  # fmt: skip
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2], help="values of k to run [default: 1 2]")
    p.add_argument("--views", type=int, default=0, help="also k=1 with this many augmented views [default: 0, none]")
    p.add_argument("--device", default="cpu", help="the server's --device [default: cpu]")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "finetune_depth.json",
                   help="JSON output [default: bench/results/finetune_depth.json]")  # fmt: skip
    return p


def held_out_accuracy(client: Any, model: str, images: list[bytes], labels: list[str]) -> float:
    answers: list[str] = []
    for start in range(0, len(images), 64):
        answers += [best[0].label for best in client.classify(images[start : start + 64], model=model, top_k=1)]
    return float(np.mean([a == b for a, b in zip(answers, labels, strict=True)]))


def settings(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    from vision_client import AugmentationConfig, HeadConfig
    from vision_client.protocol import parse_layers

    runs: list[tuple[str, dict[str, Any]]] = [
        ("frozen, linear", {}),
        ("frozen, layers", {"head": HeadConfig(layers=parse_layers(LAYERS))}),
    ]
    runs += [(f"k={k}", {"train_backbone_blocks": k}) for k in args.blocks]
    if args.views:
        runs.append(
            (f"k=1, {args.views} views", {"train_backbone_blocks": 1, "augmentation": AugmentationConfig(args.views)})
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tests.support.servers import start_server
    from vision_client import Client, FineTuneConfig, OptimizerConfig

    load_before = os.getloadavg()
    images, targets = shuffled_digits() if args.split == "shuffled" else digits()
    labels = [str(int(target)) for target in targets]
    train = list(zip(images[: args.train], labels[: args.train], strict=True))
    held_images, held_labels = images[args.train :], labels[args.train :]
    print(f"# load average {load_before}; {len(train)} digits trained on, {len(held_images)} held out", flush=True)
    runs: list[DepthRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-depth-") as work:
        server = start_server(Path(work), "--models", args.base, "--weights", "random", "--device", args.device)
        try:
            server.wait_serving(args.base, timeout=READY_TIMEOUT_S)
            with Client(server.target, timeout=600) as client:
                for number, (setting, fields) in enumerate(settings(args)):
                    config = FineTuneConfig(
                        args.base,
                        f"digits-depth-{number}",
                        epochs=args.epochs,
                        optimizer=OptimizerConfig(lr=args.lr),
                        backbone_lr_factor=args.backbone_lr_factor,
                        replace=True,
                        **fields,
                    )
                    began = time.monotonic()
                    result = client.fine_tune(config, train, timeout=3600)
                    if not result.succeeded:
                        print(f"{setting}: the job {result.state}: {result.job.error}", file=sys.stderr)
                        return 1
                    job = result.job
                    assert job.started_at is not None and job.finished_at is not None
                    seconds = job.finished_at - job.started_at
                    accuracy = held_out_accuracy(client, config.output_model, held_images, held_labels)
                    runs.append(
                        DepthRun(
                            setting=setting,
                            train_backbone_blocks=config.train_backbone_blocks,
                            head=LAYERS if config.head.kind == "custom" else config.head.kind,
                            views=config.augmentation.views,
                            held_out_accuracy=round(accuracy, 4),
                            held_out_examples=len(held_images),
                            validation_accuracy=round(job.metrics.validation_accuracy, 4),
                            best_epoch=job.metrics.best_epoch,
                            job_seconds=round(seconds, 2),
                            train_seconds=round(job.metrics.train_seconds, 2),
                            extraction_and_publish_seconds=round(seconds - job.metrics.train_seconds, 2),
                        )
                    )
                    print(
                        f"{setting}: held-out accuracy {accuracy:.4f}, job {seconds:.1f} s (training "
                        f"{job.metrics.train_seconds:.1f} s) [{time.monotonic() - began:.1f} s with the upload "
                        "and the held-out classification]",
                        flush=True,
                    )
        finally:
            server.stop()
    print()
    print(f"| setting | held-out accuracy ({len(held_images)} digits) | validation accuracy | job s | training s |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        print(
            f"| {run.setting} | {run.held_out_accuracy:.4f} | {run.validation_accuracy:.4f} | "
            f"{run.job_seconds:.1f} | {run.train_seconds:.1f} |"
        )
    document = {
        "command": "python -m bench.finetune_depth " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base_model": args.base,
        "weights": "random",
        "device": args.device,
        "train_examples": len(train),
        "split": args.split,
        "epochs": args.epochs,
        "lr": args.lr,
        "backbone_lr_factor": args.backbone_lr_factor,
        "load_average_before": [round(x, 2) for x in load_before],  # the machine's other work: noisy if high
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    write_document(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
