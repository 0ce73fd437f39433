"""The server's core without a server: registry, loaders, catalog, store sync, model control,
data plane and job manager on the tiny network, wired as ``VisionServer`` wires them, on the
running event loop. For the fast tier's tests of each piece."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from prometheus_client import generate_latest

from service.config import BatchingConfig, RuntimeConfig, ServeConfig
from service.engine.dataplane import DataPlane
from service.engine.factory import ModelFactory
from service.engine.loader import BuiltinModels
from service.engine.metrics import ServerMetrics
from service.engine.model_control import ModelControl
from service.engine.repository import ModelRepository
from service.finetune.catalog import FineTunedModels
from service.finetune.manager import JobManager
from service.finetune.store import ModelStore
from service.finetune.sync import StoreSync
from service.models import WeightsSource
from tests.conftest import session_runtime_cache
from tests.metrics_util import sample_value
from tests.tiny import TINY


@dataclass
class Core:
    config: ServeConfig
    repository: ModelRepository
    builtin: BuiltinModels
    catalog: FineTunedModels
    control: ModelControl
    sync: StoreSync | None
    store: ModelStore | None
    dataplane: DataPlane
    jobs: JobManager
    metrics: ServerMetrics

    def served(self, name: str = "pets") -> str | None:
        """The store id of the version served under ``name`` (the tests' usual fine-tuned name; None: not
        listed, or unloaded)."""
        return self.catalog.served_revision(name)

    async def sync_once(self) -> None:
        assert self.sync is not None, "no model store"
        await self.sync.sync_once()

    def metric(self, name: str, **labels: str) -> float:
        return sample_value(generate_latest(self.metrics.registry).decode(), name, **labels) or 0.0


def tiny_config(store: Path | None, **changes: Any) -> ServeConfig:
    return replace(
        ServeConfig(
            models=(TINY,),
            weights="random",
            runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
            model_store=store,
            batching=BatchingConfig(max_batch_size=8, max_queue_size=64),
            decode_threads=2,
        ),
        **changes,
    )


@asynccontextmanager
async def tiny_core(store: Path | None, **changes: Any) -> AsyncIterator[Core]:
    """The core of a server of the tiny model, loaded; its workers stopped at the end."""
    config = tiny_config(store, **changes)
    metrics, devices = ServerMetrics(), [torch.device("cpu")]
    factory = ModelFactory(config, devices, metrics)
    repository = ModelRepository(metrics, devices)
    builtin = BuiltinModels(factory, repository, WeightsSource.parse(config.weights))
    model_store = ModelStore(store, config.fine_tuning) if store is not None else None
    catalog = FineTunedModels(model_store, repository, factory, metrics, read_timeout_s=30)
    sync = StoreSync(catalog, repository, interval_s=3600) if model_store is not None else None
    pool = ThreadPoolExecutor(max_workers=config.decode_thread_count, thread_name_prefix="test-decode")
    dataplane = DataPlane(config, repository, metrics, pool, models_known=lambda: catalog.store_read)
    jobs = JobManager(dataplane, repository, builtin, catalog, metrics, config.fine_tuning)
    core = Core(
        config, repository, builtin, catalog, ModelControl(repository, builtin, catalog), sync, model_store,
        dataplane, jobs, metrics,
    )  # fmt: skip
    builtin.declare(list(config.models))
    await builtin.load_all()
    try:
        yield core
    finally:
        await jobs.shutdown()
        await repository.stop()
        pool.shutdown(wait=True)


def run_with_core(store: Path | None, scenario: Any, **changes: Any) -> Any:
    """``asyncio.run`` of ``scenario(core)`` inside :func:`tiny_core`."""

    async def main() -> Any:
        async with tiny_core(store, **changes) as core:
            return await scenario(core)

    return asyncio.run(main())
