"""Writing model store entries for tests: good ones with the server's own store code, bad ones by hand."""

from __future__ import annotations

import json
from pathlib import Path

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
