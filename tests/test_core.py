"""The data plane and the job manager without a server: the tiny network behind the real core."""

from __future__ import annotations

import asyncio
import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.engine.dataplane import InferenceInput
from service.errors import (
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
    QueueFullError,
    UnavailableError,
)
from service.finetune.job import JobState
from tests.core_util import Core, run_with_core
from tests.tiny import TINY
from vision_client.protocol import FineTuneConfig


def photo(seed: int, size: int = 48) -> bytes:
    """A real JPEG: a smooth gradient and a tint that depends on ``seed``."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.add.outer(base, base) / 2] * 3, axis=-1) * rng.uniform(0.3, 1.0, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224), dtype=np.float32)


# -- the data plane ----------------------------------------------------------------------------


def test_a_result_comes_from_the_model_that_ran_and_batching_does_not_change_it() -> None:
    async def scenario(core: Core) -> None:
        batch = pixels(5)
        together = await core.dataplane.infer(TINY, InferenceInput(pixels=batch))
        assert together.model_name == TINY and together.model_version == "1"
        assert together.logits.shape == (5, 1000) and len(together.labels) == 1000
        alone = await asyncio.gather(
            *(core.dataplane.infer(TINY, InferenceInput(pixels=batch[i : i + 1])) for i in range(5))
        )
        np.testing.assert_allclose(np.concatenate([r.logits for r in alone]), together.logits, rtol=1e-5, atol=1e-5)

    run_with_core(None, scenario)


def test_a_request_split_into_batches_is_expected_back_once() -> None:
    """20 images in batches of at most 8: only the last part's answer lets its client send again,
    so the worker waits for one arrival after it (service.engine.batching's rejoin rule), not for three."""

    async def scenario(core: Core) -> None:
        await core.dataplane.infer(TINY, InferenceInput(pixels=pixels(20)))
        assert core.repository.get(TINY).queue.returning == 1

    run_with_core(None, scenario)


def test_images_are_decoded_and_preprocessed_like_pixels_are() -> None:
    async def scenario(core: Core) -> None:
        images = [photo(seed) for seed in range(3)]
        result = await core.dataplane.infer(TINY, InferenceInput(images=images))
        assert result.logits.shape == (3, 1000) and np.isfinite(result.logits).all()
        decoder = core.repository.get(TINY).decoder
        expected = np.stack([decoder(image) for image in images])  # the model's own preprocessing
        direct = await core.dataplane.infer(TINY, InferenceInput(pixels=expected))
        np.testing.assert_allclose(result.logits, direct.logits, rtol=1e-5, atol=1e-5)

    run_with_core(None, scenario)


@pytest.mark.parametrize(
    "inputs, version, error, message",
    [
        (InferenceInput(pixels=pixels(1)), "7", ModelNotFoundError, "version"),
        (InferenceInput(pixels=pixels(65)), "", InvalidInputError, "65 images"),
        (InferenceInput(pixels=np.full((1, 3, 224, 224), math.nan, dtype=np.float32)), "", InvalidInputError, "NaN"),
        (InferenceInput(images=[b"not an image"]), "", InvalidInputError, "element 0 .* is not a decodable image"),
    ],
    ids=["version", "too-many", "nan", "not-an-image"],
)
def test_bad_requests_are_refused_with_their_reason(inputs, version, error, message) -> None:
    async def scenario(core: Core) -> None:
        with pytest.raises(error, match=message):
            await core.dataplane.infer(TINY, inputs, version=version)
        assert core.dataplane.ready()  # and the model still serves
        assert (await core.dataplane.infer(TINY, InferenceInput(pixels=pixels(1)))).logits.shape == (1, 1000)

    run_with_core(None, scenario)


def test_a_full_queue_refuses_at_once(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        reservation = core.repository.get(TINY).queue.reserve(64)  # the whole queue, held
        try:
            with pytest.raises(QueueFullError):
                await core.dataplane.infer(TINY, InferenceInput(pixels=pixels(1)))
        finally:
            reservation.release()
        await core.dataplane.infer(TINY, InferenceInput(pixels=pixels(1)))

    run_with_core(None, scenario)


def test_ready_waits_for_the_store_and_ends_with_draining(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        assert not core.dataplane.ready()  # the store has not been read
        with pytest.raises(UnavailableError, match="still reading its model store"):
            await core.dataplane.infer("pets", InferenceInput(pixels=pixels(1)))
        core.catalog.mark_store_read()
        assert core.dataplane.ready()
        with pytest.raises(ModelNotFoundError):
            await core.dataplane.infer("pets", InferenceInput(pixels=pixels(1)))
        core.dataplane.start_draining()
        assert not core.dataplane.ready() and core.dataplane.live()

    run_with_core(tmp_path / "store", scenario)


def test_requests_are_counted_under_the_model_that_ran(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        async with core.dataplane.track(TINY) as record:
            record.ran(await core.dataplane.infer(TINY, InferenceInput(pixels=pixels(1))))
        with pytest.raises(ModelNotFoundError):
            async with core.dataplane.track("nothing"):
                await core.dataplane.infer("nothing", InferenceInput(pixels=pixels(1)))
        assert core.metric("vision_requests_total", model=TINY, status="OK") == 1
        assert core.metric("vision_requests_total", model="", status="NOT_FOUND") == 1  # unknown names: one label

    run_with_core(None, scenario)


# -- the job manager ----------------------------------------------------------------------------


def examples() -> list[tuple[bytes, str]]:
    return [(photo(seed), "warm" if seed % 2 else "cold") for seed in range(12)]


async def submit(core: Core, config: FineTuneConfig):
    collector = core.jobs.collector(core.jobs.check_config(config))
    for image, label in examples():
        collector.add(image, label, [])
    return await core.jobs.submit(config, collector)


def test_a_job_extracts_trains_publishes_and_serves(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        core.catalog.mark_store_read()
        job = await submit(core, FineTuneConfig(TINY, "pets", epochs=3, batch_size=4))
        kinds = [event.kind async for event in core.jobs.watch(job.id)]
        assert kinds[0] == "queued" and "features" in kinds and kinds.count("epoch") >= 3 and kinds[-1] == "succeeded"
        done = await core.jobs.get(job.id)
        assert done.state is JobState.SUCCEEDED and done.examples is None and done.example_count == 12
        assert core.served("pets") == core.store.read_manifest("pets").version
        result = await core.dataplane.infer("pets", InferenceInput(images=[photo(0)]))
        assert list(result.labels) == ["cold", "warm"] and result.logits.shape == (1, 2)

    run_with_core(tmp_path / "store", scenario)


def test_a_cancelled_job_leaves_nothing_behind(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        core.catalog.mark_store_read()
        job = await submit(core, FineTuneConfig(TINY, "pets", epochs=1000))
        await core.jobs.cancel(job.id)
        kinds = [event.kind async for event in core.jobs.watch(job.id)]
        assert kinds[-1] == "cancelled" and (await core.jobs.get(job.id)).state is JobState.CANCELLED
        assert "pets" not in core.repository and not core.store.exists("pets")

    run_with_core(tmp_path / "store", scenario)


def test_jobs_refused_before_any_example(tmp_path: Path) -> None:
    async def scenario(core: Core) -> None:
        core.catalog.mark_store_read()
        with pytest.raises(ModelNotFoundError):
            core.jobs.check_config(FineTuneConfig("inception", "pets"))
        with pytest.raises(InvalidInputError, match="built-in"):
            core.jobs.check_config(FineTuneConfig(TINY, TINY))
        with pytest.raises(InvalidInputError, match="epochs must be at most"):
            core.jobs.check_config(FineTuneConfig(TINY, "pets", epochs=10_000))

    run_with_core(tmp_path / "store", scenario)


def test_without_a_store_jobs_are_refused_with_how_to_turn_it_on() -> None:
    async def scenario(core: Core) -> None:
        with pytest.raises(FailedPreconditionError, match="--model-store none"):
            core.jobs.check_config(FineTuneConfig(TINY, "pets"))

    run_with_core(None, scenario)
