#!/usr/bin/env python3
"""What surviving a restart costs a fine-tuning job: its kept inputs and a checkpoint per epoch.

    .venv/bin/python -m bench.job_checkpoints                 # 500 examples of 4096 features, 40 epochs
    .venv/bin/python -m bench.job_checkpoints --examples 2000 --epochs 20 --store s3://bucket/prefix

The head's training (service.finetune.trainer.train_head) runs on random features of AlexNet's width,
once without and once with checkpoints written to a store (a temporary directory by default) by
service.finetune.durable.JobKeeper, for a linear head and a two-layer one; each run reports the
training time, the time the inputs took to write, the checkpoint's size and the time per epoch the
checkpoints added. No server: the store's writes and the training thread are what is measured.
The figures and the command go to ``--output`` as JSON (bench/records.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.records import write_document
from service.finetune.durable import JobKeeper
from service.finetune.job import Job
from service.finetune.trainer import FitState, train_head
from service.storage import open_objects, parse_store_location
from vision_client.protocol import FineTuneConfig, HeadConfig

HEADS = {"linear": HeadConfig(kind="linear"), "two_layer 1024": HeadConfig(kind="two_layer", hidden=1024)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--store", default="", help="directory or s3://bucket/prefix (default: a temporary directory)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/job_checkpoints.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    features = torch.randn(args.examples, args.features)
    targets = torch.arange(args.examples) % args.classes
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as folder:
        location = parse_store_location(args.store) if args.store else Path(folder)
        assert location is not None
        objects = open_objects(location)
        for name, head in HEADS.items():
            config = FineTuneConfig(
                base_model="alexnet", output_model="bench", epochs=args.epochs, batch_size=32, head=head
            )
            started = time.perf_counter()
            train_head(features, targets, config, num_outputs=args.classes)
            plain = time.perf_counter() - started

            keeper = JobKeeper(objects, quota_bytes=1 << 40, lease_s=60.0)
            job = Job(f"{len(rows):012x}", config, [str(c) for c in range(args.classes)], args.examples)
            keeper.begin(job)
            started = time.perf_counter()
            keeper.keep_inputs(job, features, targets)
            inputs_s = time.perf_counter() - started
            spent = [0.0]

            def checkpoint(
                state: FitState, job: Job = job, keeper: JobKeeper = keeper, spent: list[float] = spent
            ) -> None:
                began = time.perf_counter()
                keeper.checkpoint(job.id, state)
                spent[0] += time.perf_counter() - began

            started = time.perf_counter()
            train_head(features, targets, config, num_outputs=args.classes, on_checkpoint=checkpoint)
            kept = time.perf_counter() - started
            info = objects.head(f".jobs/live/{job.id}/checkpoint.safetensors")
            size = info.size if info is not None else 0
            keeper.end(job.id)
            rows.append(
                {
                    "head": name,
                    "train_s": round(plain, 3),
                    "train_with_checkpoints_s": round(kept, 3),
                    "checkpoint_s_per_epoch": round(spent[0] / args.epochs, 4),
                    "checkpoint_mib": round(size / 2**20, 2),
                    "inputs_s": round(inputs_s, 3),
                    "inputs_mib": round(features.nelement() * 4 / 2**20, 1),
                }
            )
            print(
                f"{name:15s} train {plain:7.2f}s  with checkpoints {kept:7.2f}s  "
                f"({spent[0] / args.epochs * 1000:6.1f} ms/epoch, {size / 2**20:6.2f} MiB each)  "
                f"inputs {rows[-1]['inputs_mib']} MiB in {inputs_s:.3f}s"
            )
    write_document(
        args.output,
        {
            "command": " ".join([Path(sys.executable).name, "-m", "bench.job_checkpoints", *(argv or sys.argv[1:])]),
            "store": "s3" if args.store.startswith("s3://") else "directory",
            "examples": args.examples,
            "features": args.features,
            "epochs": args.epochs,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
