"""Helpers of the SDK tests: one test body for both twins, ``Client`` and ``AsyncClient``.

``connect(kind, ...)`` opens either; ``result()`` awaits what needs awaiting and
``collect()`` drains an iterator or an async iterator, so that a body written once
runs with both. ``run()`` runs the body. ``inprocess_server()`` is a real server in
the test process, for a module's fixtures (the SDK needs no process boundary).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from tests.conftest import TOKEN
from vision_client import AsyncClient, AugmentationConfig, Client, FineTuneConfig, HeadConfig, OptimizerConfig

ROOT = Path(__file__).resolve().parent.parent
READMES = (ROOT / "clients" / "python" / "README.md", ROOT / "README.md")
"""The pages whose python examples the tests run: the SDK's and the project's tour."""
CLI = Path(sys.executable).parent / "vision-client"
FINE_TUNING_SECTION = "Fine-tuning"


CALL_TIMEOUT = 120.0
"""The tests' default deadline per call: generous, as a loaded 2-core machine can be slow (no
test is about speed; those about deadlines set their own)."""


@contextlib.asynccontextmanager
async def connect(kind: str, target: str, **options: Any) -> AsyncIterator[Any]:
    """A ``Client`` or an ``AsyncClient``, opened and closed as its users would."""
    options.setdefault("timeout", CALL_TIMEOUT)
    if kind == "sync":
        with Client(target, **options) as client:
            yield client
    else:
        async with AsyncClient(target, **options) as client:
            yield client


async def result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def collect(iterator: Any) -> list[Any]:
    """Every item of an iterator or an async iterator."""
    if hasattr(iterator, "__aiter__"):
        return [item async for item in iterator]
    return list(iterator)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@contextlib.contextmanager
def inprocess_server(directory: Path, weights_dir: Path, *, grpc_port: int = 0, **overrides: Any) -> Iterator[Any]:
    """The tests' usual in-process server (:func:`tests.inprocess.alexnet_config`) with a model
    store in ``directory``, loaded, then stopped; for module-scoped fixtures.

    ``grpc_port``: listen there rather than on a free port (one a client already targets).
    """
    from tests.inprocess import alexnet_config, running

    with running(alexnet_config(directory / "store", weights_dir, **overrides), grpc_port=grpc_port) as server:
        yield server


@contextlib.contextmanager
def token_server(directory: Path, weights_dir: Path) -> Iterator[Any]:
    """:func:`inprocess_server` wanting ``Bearer TOKEN`` for fine-tuning calls."""
    (directory / "token").write_text(TOKEN + "\n")
    with inprocess_server(directory, weights_dir, auth_token_file=directory / "token") as server:
        yield server


EVERY_SETTING = FineTuneConfig(
    base_model="resnet101",
    output_model="every-setting",
    head=HeadConfig("parallel", hidden=64, blocks=3, dropout=0.25),
    optimizer=OptimizerConfig("sgd", lr=0.05, momentum=0.5, weight_decay=1e-4, beta1=0.8, beta2=0.99),
    loss="mse",
    epochs=7,
    batch_size=16,
    validation_fraction=0.3,
    seed=2**40,
    early_stopping_patience=3,
    refit=False,
    replace=True,
    augmentation=AugmentationConfig(views=2, crop=False, crop_scale=(0.5, 0.9)),  # a view needs crop or flip
)
"""A job's config with no field at its default, so that a field left behind shows (but for
``augmentation.horizontal_flip``, which views without crop need, and ``class_weights``, which mse
refuses: tests/test_finetune_metrics.py converts those)."""


def readme_examples(*, fine_tuning: bool) -> list[str]:
    """The READMEs' python blocks: those of their fine-tuning sections, or all the others.

    The fine-tuning examples need a server with a model store, so they run in
    ``test_client_finetune.py``; the others in ``test_client.py``.
    """
    sections = [section for readme in READMES for section in re.split(r"^## ", readme.read_text(), flags=re.M)]
    return [
        block
        for section in sections
        if section.startswith(FINE_TUNING_SECTION) == fine_tuning
        for block in re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    ]


def vision_client(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run the ``vision-client`` command, without the caller's ``VISION_CLIENT_*`` settings."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VISION_CLIENT_")}
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=300, env={**environment, **(env or {})}, **kwargs
    )
