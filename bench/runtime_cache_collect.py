#!/usr/bin/env python3
"""What a pass of the runtime cache's collection costs (service/runtimes/export.py, ``collect``).

A cache of N entries (copies of the tiny network's export under distinct keys, spread over 50
models' folders) is collected twice: with every entry used lately (the pass a server makes on each
store poll: a listing and a ``stat`` per entry), then with every entry unused for two hours and ten
leased (the deletions). ``.venv/bin/python -m bench.runtime_cache_collect [N]``; figures in docs/operations.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from service.models import WeightsSource, build_model, get_model_spec
from service.runtimes.export import ENTRY_FILE, ExportCache
from service.runtimes.select import BackendLoader, RuntimeOptions


def main(count: int) -> None:
    spec = get_model_spec("tiny")
    root = Path(tempfile.mkdtemp(prefix="runtime-cache-bench-"))
    try:
        net = build_model(spec, WeightsSource.parse("random"))
        loader = BackendLoader(spec, net, RuntimeOptions("onnxruntime", root, threads=1))
        loader.load("onnxruntime", torch.device("cpu"), torch.float32)
        source = loader.export_entry
        assert source is not None
        for i in range(count):
            shutil.copytree(source, root / f"m{i % 50}" / (f"{i:024x}" + source.name[24:]))
        started = time.perf_counter()
        result = ExportCache(root).collect()
        elapsed = 1000 * (time.perf_counter() - started)
        print(f"{count} entries, all used lately: {elapsed:.1f} ms, {result.recent} kept")
        then = time.time() - 7200
        for entry in root.glob("*/*"):
            if (entry / ENTRY_FILE).exists():
                os.utime(entry / ENTRY_FILE, (then, then))
        held = sorted(root.glob("*/*"))[:10]
        started = time.perf_counter()
        result = ExportCache(root).collect(held=held)
        print(
            f"{count} entries, all unused for 2 h, 10 leased: {1000 * (time.perf_counter() - started):.1f} ms, "
            f"{len(result.removed)} deleted ({result.removed_bytes / 1e6:.1f} MB), {result.kept} kept"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
