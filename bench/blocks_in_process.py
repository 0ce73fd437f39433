#!/usr/bin/env python3
"""Trained backbone blocks against a frozen head, in this process: the trainer alone, no server.

    .venv/bin/python -m bench.blocks_in_process                                # resnet101, k = 1
    .venv/bin/python -m bench.blocks_in_process --factors 0.01 0.1 --epochs 10

What ``bench.finetune_depth`` measures through a server, for bases whose extraction a server run
makes long (ResNet101's prefix: about 7 minutes for 1,000 digits on 2 cores): a seeded random base
(``--weights random``'s initialization is the model's own, seeded here), scikit-learn's digits
(upscaled to 64x64 PNGs, preprocessed as the base's weights say), ``--train`` of them (a seeded
shuffle) trained on and ``--held-out`` of the others held out. The prefix runs once; then, on the
same activations, ``train_head`` (:mod:`service.finetune.trainer`) trains a linear head on the
frozen blocks' output, and the last ``--blocks`` blocks with a linear head at each of
``--factors``, with no refit (``refit=False``). Held-out accuracy through the trained part in
inference mode, as served. Figures and the command go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.records import write_document
from service.finetune.trainer import train_head
from service.models import WeightsSource, build_model, get_model_spec
from service.models.blocks import split_at
from tests.support.finetune_data import shuffled_digits
from vision_client import FineTuneConfig

ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="resnet101", help="base model [default: resnet101]")
    p.add_argument("--blocks", type=int, default=1, help="blocks trained [default: 1]")
    p.add_argument("--factors", type=float, nargs="+", default=[0.01], help="backbone_lr_factor values [0.01]")
    p.add_argument("--train", type=int, default=500, help="digits trained on [default: 500]")
    p.add_argument("--held-out", type=int, default=500, help="digits held out [default: 500]")
    p.add_argument("--epochs", type=int, default=5, help="epochs [default: 5]")
    p.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "blocks_in_process.json", help="JSON figures"
    )
    return p


def held_out_accuracy(part: torch.nn.Module, activations: torch.Tensor, targets: torch.Tensor) -> float:
    part.eval()
    with torch.inference_mode():
        logits = torch.cat([part(chunk) for chunk in activations.split(50)])
    return float((logits.argmax(1) == targets).float().mean())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = get_model_spec(args.base)
    net = build_model(spec, WeightsSource.parse("random")).eval()
    transforms = spec.weights.transforms()
    images, labels = shuffled_digits()
    train, held = np.arange(args.train), np.arange(args.train, args.train + args.held_out)
    prefix, blocks = split_at(spec, net, args.blocks)
    print(f"# {args.base}, k = {args.blocks}; {len(train)} digits trained on, {len(held)} held out; "
          f"load average {os.getloadavg()}", flush=True)  # fmt: skip

    started = time.monotonic()
    with torch.inference_mode():
        chunks = []
        for idx in np.array_split(np.concatenate([train, held]), max(1, (len(train) + len(held)) // 25)):
            pixels = torch.stack([transforms(Image.open(io.BytesIO(images[i])).convert("RGB")) for i in idx])
            chunks.append(prefix(pixels))
        activations = torch.cat(chunks)
    extraction_s = time.monotonic() - started
    print(f"prefix: {tuple(activations.shape[1:])} per image, {extraction_s:.0f} s", flush=True)
    x_train, x_held = activations[: len(train)], activations[len(train) :]
    y_train, y_held = torch.as_tensor(labels[train]), torch.as_tensor(labels[held])

    rows: list[dict[str, Any]] = []

    def record(setting: str, factor: float | None, config: FineTuneConfig, trunk: torch.nn.Module | None) -> None:
        started = time.monotonic()
        if trunk is None:
            with torch.inference_mode():
                features_train, features_held = blocks(x_train), blocks(x_held)
            result = train_head(features_train.clone(), y_train, config, num_outputs=10)
            accuracy = held_out_accuracy(result.head, features_held, y_held)
        else:
            result = train_head(x_train, y_train, config, num_outputs=10, trunk=trunk)
            accuracy = held_out_accuracy(result.head, x_held, y_held)
        seconds = time.monotonic() - started
        rows.append({"setting": setting, "backbone_lr_factor": factor, "held_out_accuracy": accuracy,
                     "validation_accuracy": result.metrics.validation_accuracy, "seconds": seconds})  # fmt: skip
        print(f"{setting}: held-out {accuracy:.4f}, validation {result.metrics.validation_accuracy:.4f}, "
              f"{seconds:.0f} s", flush=True)  # fmt: skip

    common = {"base_model": args.base, "output_model": "bench", "epochs": args.epochs, "refit": False}
    record("frozen, linear", None, FineTuneConfig(**common), None)
    for factor in args.factors:
        config = FineTuneConfig(**common, train_backbone_blocks=args.blocks, backbone_lr_factor=factor)
        record(f"k={args.blocks}, factor {factor:g}", factor, config, blocks)

    print("\n| setting | held-out accuracy | validation accuracy | s |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | {row['held_out_accuracy']:.4f} | {row['validation_accuracy']:.4f} | "
              f"{row['seconds']:.0f} |")  # fmt: skip
    document = {"command": [sys.executable, "-m", "bench.blocks_in_process", *(argv or sys.argv[1:])],
                "load_average_at_start": os.getloadavg(), "extraction_s": extraction_s, "rows": rows}  # fmt: skip
    write_document(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
