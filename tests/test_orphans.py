"""Fine-tuned models and their base model's comings and goings: what is in the store and whose
base is served, is served; a job that fails leaves nothing behind (not even for a full disk).
In-process servers of the tiny model (tests/tiny.py)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as triton
from PIL import Image

from service.config import RuntimeConfig
from service.finetune.store import MANIFEST
from tests.conftest import session_runtime_cache
from tests.store_util import save_head
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client import Client, FineTuneConfig, HeadConfig

LABELS = ("dark", "light")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tiny_server(serve_inprocess, store: Path):
    return serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        model_store=store,
        store_poll_seconds=3600,  # the tests run the polls
    )


def examples(count: int = 12) -> list[tuple[bytes, str]]:
    out = []
    for i in range(count):
        label = LABELS[i % 2]
        shade = 30 + i if label == "dark" else 220 - i
        buffer = io.BytesIO()
        Image.new("RGB", (48, 48), (shade, shade, shade)).save(buffer, format="PNG")
        out.append((buffer.getvalue(), label))
    return out


def ready(server, name: str) -> bool:
    with triton.InferenceServerClient(server.target) as client:
        try:
            return bool(client.is_model_ready(name))
        except Exception:
            return False


def poll(server) -> None:
    server.call(server.server.store_sync.sync_once())


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_an_entry_that_arrives_while_its_base_is_unloaded_is_served_once_the_base_is_back(
    tiny_server, store: Path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    with triton.InferenceServerClient(tiny_server.target) as client:
        client.unload_model(TINY)
        save_head(store, "late", base=TINY, features=TINY_FEATURE_DIM)
        poll(tiny_server)
        poll(tiny_server)  # polled twice: logged and counted once
        assert not ready(tiny_server, "late")
        assert caplog.text.count("base model 'tiny' is not loaded") == 1
        client.load_model(TINY)
        poll(tiny_server)
        assert ready(tiny_server, "late")
    no_tracebacks(caplog)


def test_models_unloaded_with_their_base_come_back_with_it(tiny_server, store: Path) -> None:
    save_head(store, "dependent", base=TINY, features=TINY_FEATURE_DIM)
    poll(tiny_server)
    assert ready(tiny_server, "dependent")
    with triton.InferenceServerClient(tiny_server.target) as client:
        client.unload_model(TINY)
        assert not ready(tiny_server, "dependent")
        poll(tiny_server)
        assert not ready(tiny_server, "dependent")
        client.load_model(TINY)
    assert ready(tiny_server, "dependent")


def test_a_job_whose_base_is_unloaded_while_it_trains_fails_and_leaves_nothing(
    tiny_server, store: Path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    config = FineTuneConfig(base_model=TINY, output_model="orphan", epochs=1000, batch_size=1, seed=3)
    unloaded = []

    def on_event(event) -> None:
        if event.kind == "epoch" and not unloaded:
            with triton.InferenceServerClient(tiny_server.target) as client:
                client.unload_model(TINY)  # while the head trains on the extracted features
            unloaded.append(event.epoch)

    with Client(tiny_server.target) as sdk:
        result = sdk.fine_tune(config, examples(), on_event=on_event, timeout=300)
        assert unloaded and result.state == "failed", result
        assert "was unloaded while the job ran" in result.error
        assert not (store / "orphan").exists()  # nothing left behind: the name is free
        with triton.InferenceServerClient(tiny_server.target) as client:
            client.load_model(TINY)
        poll(tiny_server)
        assert not ready(tiny_server, "orphan")
        again = sdk.fine_tune(
            FineTuneConfig(base_model=TINY, output_model="orphan", epochs=2, seed=3), examples(), timeout=300
        )
        assert again.state == "succeeded", again
    assert ready(tiny_server, "orphan")
    no_tracebacks(caplog)


def test_a_job_that_finds_the_store_full_fails_clearly_and_leaves_nothing(serve_inprocess, tmp_path, caplog) -> None:
    """The store on a tmpfs too small for the head's weights (a two-layer head of 8,192 hidden)."""
    caplog.set_level(logging.INFO)
    store = tmp_path / "small-store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(store)], check=True)
    try:
        server = serve_inprocess(
            models=(TINY,),
            weights="random",
            runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
            model_store=store,
        )
        config = FineTuneConfig(
            base_model=TINY, output_model="big", epochs=1, head=HeadConfig("two_layer", hidden=8192)
        )
        with Client(server.target) as sdk:
            result = sdk.fine_tune(config, examples(), timeout=300)
            assert result.state == "failed", result
            assert "free space" in result.error, result.error
            assert sdk.job(result.job_id).state == "failed"  # the record, kept in memory when the store is full
        assert not ready(server, "big")
        leftovers = [p.name for p in store.iterdir() if p.name != ".jobs"]
        assert leftovers == [], leftovers
        assert not any(store.glob(f"*/{MANIFEST}"))
        no_tracebacks(caplog)
        server.stop()
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)
    assert os.path.isdir(store)
