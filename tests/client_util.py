"""Helpers of the SDK tests: one test body for both twins, ``Client`` and ``AsyncClient``.

``connect(kind, ...)`` opens either; ``result()`` awaits what needs awaiting and
``collect()`` drains an iterator or an async iterator, so that a body written once
runs with both. ``run()`` runs the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from vision_client import AsyncClient, Client

README = Path(__file__).resolve().parent.parent / "clients" / "python" / "README.md"
CLI = Path(sys.executable).parent / "vision-client"
FINE_TUNING_SECTION = "Fine-tuning"


@contextlib.asynccontextmanager
async def connect(kind: str, target: str, **options: Any) -> AsyncIterator[Any]:
    """A ``Client`` or an ``AsyncClient``, opened and closed as its users would."""
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


def readme_examples(*, fine_tuning: bool) -> list[str]:
    """The README's python blocks: those of its fine-tuning section, or all the others.

    The fine-tuning examples need a server with a model store, so they run in
    ``test_client_finetune.py``; the others in ``test_client.py``.
    """
    sections = re.split(r"^## ", README.read_text(), flags=re.M)
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
