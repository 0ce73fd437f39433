"""Writing model store entries for tests: good ones with the server's own store code, bad ones by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from service.finetune.heads import build_standardized_head
from service.finetune.store import MANIFEST, Manifest, ModelStore
from service.storage import StoreLocation
from vision_client.protocol import HeadConfig

ALEXNET_FEATURES = 4096


def save_head(
    store: StoreLocation,
    name: str,
    *,
    seed: int = 0,
    labels: tuple[str, ...] = ("a", "b", "c"),
    features: int = ALEXNET_FEATURES,
    base: str = "alexnet",
) -> Manifest:
    """A random linear head on AlexNet's features (or another base and width), saved as ``name``."""
    torch.manual_seed(seed)
    head = build_standardized_head(HeadConfig(), features, len(labels))
    return ModelStore(store).save(
        name=name, base_model=base, head_spec=HeadConfig(), head=head, labels=list(labels),
        loss="cross_entropy", job_id="test",
    )  # fmt: skip


def manifest_of(store: Path, name: str) -> dict:
    return json.loads((store / name / MANIFEST).read_text())


def write_manifest(store: Path, name: str, data: dict | str) -> None:
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(data if isinstance(data, str) else json.dumps(data))


def publish_forever(location: StoreLocation, base: str, features: int, ready: Any) -> None:
    """A writer that does nothing but publish (a child process, to be killed): a new name once,
    then replacements of one name. Here, so that a fork server that imported this module starts
    it at once."""
    spec = HeadConfig("two_layer", hidden=1024)
    store = ModelStore(location)
    head = build_standardized_head(spec, features, 3)
    ready.set()
    for i in range(1_000_000):
        name, replace = (f"fresh-{os.getpid()}", False) if i == 0 else ("contested", True)
        store.save(
            name=name, base_model=base, head_spec=spec, head=head, labels=["a", "b", "c"],
            loss="cross_entropy", job_id=f"{i:012x}", replace=replace,
        )  # fmt: skip
