"""What serving an older version of a fine-tuned model costs: the first request that names a kept
version that is not resident (read from the store, built on the base model's backbone, warmed up),
a request for it once resident, and rollbacks (to the resident version, to one not resident).

The server's core (registry, catalog, store) in this process on a directory store, the base model
with seeded random weights and the torch runtime; three linear heads of 10 classes published under
one name. The median of ``--rounds`` rounds, each on a fresh store.

    .venv/bin/python -m bench.version_load --models tiny,alexnet --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from service.models import get_model_spec


def _round(model: str) -> dict[str, float]:
    from tests.core_util import run_with_core
    from tests.store_util import save_head

    store = Path(tempfile.mkdtemp(prefix="version-load-"))
    labels = tuple(f"class-{i}" for i in range(10))
    for seed in (1, 2, 3):
        save_head(store, "pets", seed=seed, labels=labels, features=get_model_spec(model).feature_dim, base=model)

    async def scenario(core: Any) -> dict[str, float]:
        await core.sync_once()
        repository, catalog = core.repository, core.catalog
        times: dict[str, float] = {}
        started = time.perf_counter()
        await repository.get_version_ready("pets", "1")
        times["first request for version 1 (load)"] = time.perf_counter() - started
        started = time.perf_counter()
        await repository.get_version_ready("pets", "1")
        times["request for version 1, resident"] = time.perf_counter() - started
        started = time.perf_counter()
        await catalog.rollback("pets", "1")
        times["rollback to the resident version"] = time.perf_counter() - started
        started = time.perf_counter()
        await catalog.rollback("pets", "2")
        times["rollback to a version not resident"] = time.perf_counter() - started
        return times

    result: dict[str, float] = run_with_core(store, scenario, models=(model,))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,alexnet", help="base models, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("VISION_SERVE_RUNTIME_CACHE", tempfile.mkdtemp(prefix="version-load-cache-"))
    for model in args.models.split(","):
        rounds = [_round(model) for _ in range(args.rounds)]
        for what in rounds[0]:
            median = statistics.median(r[what] for r in rounds)
            print(f"{model:<10} {what:<40} {median * 1000:9.3f} ms")


if __name__ == "__main__":
    main()
