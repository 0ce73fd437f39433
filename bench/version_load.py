"""What serving an older version of a fine-tuned model costs, seen by a client of a real server:
the first request that names a kept version that is not resident (read from the store, built on
the base model's backbone, warmed up), a request for it once resident, and rollbacks (to the
resident version, to one not resident), each one SDK call.

Each round starts ``vision-serve`` (the base model with seeded random weights, the torch runtime)
on a fresh directory store where three linear heads of 10 classes were published under one name.
The median of ``--rounds`` rounds.

    .venv/bin/python -m bench.version_load --models tiny,alexnet --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from service.finetune.heads import build_standardized_head
from service.finetune.store import ModelStore
from service.models import get_model_spec
from tests.support.servers import start_server
from vision_client import Client, HeadConfig

NAME = "pets"


def _publish_three(store: Path, model: str) -> None:
    labels = [f"class-{i}" for i in range(10)]
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        head = build_standardized_head(HeadConfig(), get_model_spec(model).feature_dim, len(labels))
        ModelStore(store).save(
            name=NAME, base_model=model, head_spec=HeadConfig(), head=head, labels=labels,
            loss="cross_entropy", job_id=f"bench-{seed}",
        )  # fmt: skip


def _round(model: str, folder: Path) -> dict[str, float]:
    store = folder / "store"
    _publish_three(store, model)
    server = start_server(
        folder, "--models", model, "--weights", "random", "--runtime", "torch", "--model-store", str(store),
        "--runtime-cache", str(folder / "cache"),
    )  # fmt: skip
    try:
        server.wait_serving(NAME)
        pixels = np.full((256, 256, 3), 128, dtype=np.uint8)  # one image, encoded by the SDK
        times: dict[str, float] = {}
        with Client(server.target, timeout=300) as client:
            client.logits(pixels, NAME)  # the connection and the served version's first request

            def timed(what: str, call: object) -> None:
                started = time.perf_counter()
                call()  # type: ignore[operator]
                times[what] = time.perf_counter() - started

            timed("first request for version 1 (load)", lambda: client.logits(pixels, NAME, version=1))
            timed("request for version 1, resident", lambda: client.logits(pixels, NAME, version=1))
            timed("rollback to the resident version", lambda: client.rollback_model(NAME, 1))
            timed("rollback to a version not resident", lambda: client.rollback_model(NAME, 2))
        return times
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,alexnet", help="base models, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for model in args.models.split(","):
        rounds = []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="version-load-") as folder:
                rounds.append(_round(model, Path(folder)))
        for what in rounds[0]:
            median = statistics.median(r[what] for r in rounds)
            print(f"{model:<10} {what:<40} {median * 1000:9.3f} ms")


if __name__ == "__main__":
    main()
