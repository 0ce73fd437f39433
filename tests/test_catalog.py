"""The catalog of fine-tuned models on its own: the core (registry, loaders, catalog, store) on the
tiny network, no gRPC server. Each race is forced: the slow part of one operation (a store write,
a store read) is held open while another request lands, and the end state must be what the last
request asked for."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from service.config import ServeConfig
from service.engine.factory import ModelFactory
from service.engine.metrics import ServerMetrics
from service.engine.repository import ModelRepository
from service.errors import (
    AlreadyExistsError,
    BuiltinModelError,
    FailedPreconditionError,
    ModelNotFoundError,
    UnavailableError,
)
from service.finetune.catalog import FineTunedModels
from service.finetune.heads import build_standardized_head
from service.finetune.store import ModelStore
from service.finetune.trainer import TrainMetrics
from tests.core_util import Core, run_with_core
from tests.store_util import save_head
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client.protocol import FineTuneConfig, HeadConfig

NAME = "pets"


def run(scenario: Callable[[Core], Awaitable[Any]], store_root: Path) -> Any:
    return run_with_core(store_root, scenario)


def head(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build_standardized_head(HeadConfig(), TINY_FEATURE_DIM, 2)


async def publish(core: Core, *, seed: int = 0, replace: bool = False) -> str:
    config = FineTuneConfig(TINY, NAME, replace=replace)
    manifest = await core.catalog.publish(config, head(seed), ["cat", "dog"], TrainMetrics(), "job")
    return manifest.version


@contextmanager
def held(obj: Any, method: str) -> Iterator[tuple[threading.Event, threading.Event]]:
    """``obj.method`` (run in a worker thread) does its work, then waits: (done, release)."""
    original = getattr(obj, method)
    done, release = threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        done.set()
        assert release.wait(30)
        return result

    setattr(obj, method, slow)
    try:
        yield done, release
    finally:
        release.set()
        setattr(obj, method, original)


async def during(
    slow: Awaitable[Any], hold: tuple[threading.Event, threading.Event], request: Callable[[], Awaitable[Any] | Any]
) -> Any:
    """Start ``slow``; once its held step has done its work, make ``request``; then let it finish.
    Returns ``slow``'s result, or the exception it raised."""
    done, release = hold
    task = asyncio.ensure_future(slow)
    assert await asyncio.to_thread(done.wait, 30)
    outcome = request()
    if asyncio.iscoroutine(outcome):
        await outcome
    release.set()
    try:
        return await task
    except Exception as error:
        return error


# -- publish ---------------------------------------------------------------------------------


def test_publish_serves_what_it_wrote_and_claims_the_name(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        version = await publish(core)
        assert core.served() == version and core.store.read_manifest(NAME).version == version
        with pytest.raises(AlreadyExistsError, match="pick another name or set replace"):
            await publish(core, seed=1)  # replace=False: the name is taken
        assert core.served() == version

    run(scenario, tmp_path / "store")


def test_delete_during_publish_wins(tmp_path: Path) -> None:
    """DeleteModel lands after the job wrote the head and before it is served: nothing is served,
    nothing stays in the store."""

    async def scenario(core: Core) -> None:
        with held(core.store, "save") as hold:
            outcome = await during(publish(core), hold, lambda: core.catalog.delete(NAME))
        assert isinstance(outcome, UnavailableError) and "deleted or unloaded" in outcome.message
        assert NAME not in core.repository and not core.store.exists(NAME)

    run(scenario, tmp_path / "store")


def test_unload_during_a_replacing_publish_wins(tmp_path: Path) -> None:
    """RepositoryModelUnload lands while a job replaces the served model: the model stays
    unloaded (the new version waits in the store for the next load)."""

    async def scenario(core: Core) -> None:
        await publish(core)
        with held(core.store, "save") as hold:
            outcome = await during(publish(core, seed=1, replace=True), hold, lambda: core.control.unload(NAME))
        assert isinstance(outcome, UnavailableError)
        assert core.repository.get(NAME).unloaded and core.served() is None
        newest = core.store.read_manifest(NAME).version
        await core.control.load(NAME)
        assert core.served() == newest

    run(scenario, tmp_path / "store")


def test_a_base_unloaded_during_publish_leaves_no_entry(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        with held(core.store, "save") as hold:
            outcome = await during(publish(core), hold, lambda: core.control.unload(TINY))
        assert isinstance(outcome, UnavailableError) and "base model" in outcome.message
        assert NAME not in core.repository and not core.store.exists(NAME)

    run(scenario, tmp_path / "store")


# -- the poll and the explicit load ---------------------------------------------------------------


@pytest.mark.parametrize("action", ["delete", "unload"])
def test_a_request_during_a_polls_read_wins(tmp_path: Path, action: str) -> None:
    store = tmp_path / "store"
    save_head(store, NAME, features=TINY_FEATURE_DIM, base=TINY)

    async def scenario(core: Core) -> None:
        await core.sync_once()
        first = core.served()
        assert first is not None
        save_head(store, NAME, seed=1, features=TINY_FEATURE_DIM, base=TINY)  # a new version to read
        request = (lambda: core.catalog.delete(NAME)) if action == "delete" else (lambda: core.control.unload(NAME))
        with held(core.store, "load") as hold:
            await during(core.sync_once(), hold, request)
        if action == "delete":
            assert NAME not in core.repository and not core.store.exists(NAME)
        else:
            assert core.repository.get(NAME).unloaded and core.served() is None
        await core.sync_once()  # the next poll does not undo it
        assert (NAME in core.repository) == (action == "unload") and core.served() is None
        for outcome in ("withdrawn", "missing"):  # outcomes, not errors
            assert core.metric("vision_store_errors_total", reason=outcome) == 0

    run(scenario, store)


@pytest.mark.parametrize("action", ["delete", "unload"])
def test_a_request_during_an_explicit_load_wins(tmp_path: Path, action: str) -> None:
    store = tmp_path / "store"
    save_head(store, NAME, features=TINY_FEATURE_DIM, base=TINY)

    async def scenario(core: Core) -> None:
        await core.sync_once()
        await core.control.unload(NAME)
        request = (
            (lambda: core.catalog.delete(NAME)) if action == "delete" else (lambda: core.catalog.unload(NAME, "again"))
        )
        with held(core.store, "load") as hold:
            outcome = await during(core.catalog.load(NAME), hold, request)
        assert isinstance(outcome, UnavailableError) and "while it was read" in outcome.message
        if action == "delete":
            assert NAME not in core.repository and not core.store.exists(NAME)
        else:
            assert core.repository.get(NAME).unloaded and core.served() is None

    run(scenario, store)


def test_an_entry_waits_for_its_base_and_is_counted_once(tmp_path: Path) -> None:
    store = tmp_path / "store"

    async def scenario(core: Core) -> None:
        await core.control.unload(TINY)
        save_head(store, NAME, features=TINY_FEATURE_DIM, base=TINY)
        for _ in range(3):
            await core.sync_once()
        assert NAME not in core.repository and core.metric("vision_store_errors_total", reason="base_unloaded") == 1
        await core.control.load(TINY)
        await core.sync_once()
        assert core.served() == core.store.read_manifest(NAME).version

    run(scenario, store)


def test_delete_refuses_built_in_models_and_unknown_names(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        with pytest.raises(BuiltinModelError):
            core.catalog.delete(TINY)
        with pytest.raises(ModelNotFoundError):
            core.catalog.delete("nothing-here")

    run(scenario, tmp_path / "store")


def test_without_a_store_fine_tuning_says_how_to_turn_it_on(tmp_path: Path) -> None:
    metrics = ServerMetrics()
    repository = ModelRepository(metrics, [torch.device("cpu")])
    factory = ModelFactory(ServeConfig(models=(TINY,), model_store=None), [torch.device("cpu")], metrics)
    catalog = FineTunedModels(None, repository, factory, metrics)
    assert catalog.store_read  # nothing to wait for
    with pytest.raises(FailedPreconditionError, match="--model-store none"):
        catalog.delete(NAME)
    with pytest.raises(ModelNotFoundError):
        repository.get(NAME)


def test_until_the_store_is_read_unknown_names_are_unavailable(tmp_path: Path) -> None:
    metrics = ServerMetrics()
    repository = ModelRepository(metrics, [torch.device("cpu")])
    factory = ModelFactory(ServeConfig(models=(TINY,)), [torch.device("cpu")], metrics)
    catalog = FineTunedModels(ModelStore(tmp_path / "store"), repository, factory, metrics)
    with pytest.raises(UnavailableError, match="still reading its model store"):
        repository.get(NAME)
    with pytest.raises(ModelNotFoundError):
        repository.get("Not A Model Name")  # could never be in a store
    catalog.mark_store_read()
    with pytest.raises(ModelNotFoundError):
        repository.get(NAME)
