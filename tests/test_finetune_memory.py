"""What a fine-tuning job keeps in memory: only its features and targets once they are extracted,
never a chunk's images or pixels after their features are in, nothing once it has ended; and the
allocator settings the server starts with. RSS itself is measured by bench/finetune_check_memory.py."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.engine.dataplane import InferenceInput
from service.finetune.examples import ExampleCollector
from service.finetune.job import Job, JobEvent, JobState
from service.finetune.pipeline import FEATURE_CHUNK, FEATURE_DTYPE, JobPipeline, put_rows
from service.finetune.trainer import ROWS_AT_ONCE, _statistics
from service.host.memory import MMAP_THRESHOLD_BYTES, THRESHOLD_VARIABLE, configure_allocator, trim
from tests.core_util import Core, run_with_core
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client.protocol import FineTuneConfig

COUNT = 5 * FEATURE_CHUNK + 3  # six chunks, the last one short
LAST_CHUNK = 5 * FEATURE_CHUNK  # where the last chunk starts


def image(index: int) -> bytes:
    """A distinct small PNG per example, recognisable by its bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (index % 256, index // 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def live_images(count: int) -> set[int]:
    """Indexes of the examples ``image(0..count-1)`` whose bytes some live object still refers to
    (by value: a copy counts too). The test itself keeps only their hashes, never the bytes."""
    wanted: dict[int, list[int]] = {}
    for index in range(count):
        wanted.setdefault(hash(image(index)), []).append(index)
    found: set[int] = set()
    for holder in gc.get_objects():
        for value in gc.get_referents(holder):
            if type(value) is bytes and hash(value) in wanted:
                found.update(index for index in wanted[hash(value)] if image(index) == value)
    return found


def live_pixels(side: int = 224) -> int:
    """Images' worth of pixels held by live tensors of images ([..., 3, side, side]).

    Counted by storage, once each: a view (a work item's rows of a request's pixels) keeps its
    whole storage, and its base tensor, alive."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.dim() >= 3 and tuple(obj.shape[-3:]) == (3, side, side):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) // (3 * side * side * 4)


def worker_pixels() -> int:
    """What a model's idle worker may still hold: the storage of its last batch's rows, one chunk
    of a job's images (service/engine/runtime.py keeps the batch until it takes the next)."""
    return FEATURE_CHUNK


def live_features(rows: int) -> list[tuple[int, ...]]:
    """Shapes of live tensors with a job's row count of features."""
    return [
        tuple(obj.shape)
        for obj in gc.get_objects()
        if isinstance(obj, torch.Tensor) and tuple(obj.shape) == (rows, TINY_FEATURE_DIM)
    ]


def collect(core: Core, config: FineTuneConfig) -> ExampleCollector:
    """The job's examples as they would stream in: ``image(i)`` labelled by the parity of i."""
    collector = core.jobs.collector(core.jobs.check_config(config))
    for index in range(COUNT):
        collector.add(image(index), "odd" if index % 2 else "even", [])
    return collector


async def new_job(core: Core, config: FineTuneConfig) -> Job:
    return await core.jobs.submit(config, collect(core, config))


def test_feature_extraction_lets_each_chunk_go_and_keeps_only_features_and_targets(tmp_path: Path) -> None:
    """After each chunk, the images of the chunks done are gone (from the job and from everywhere) and
    no pixels are alive; afterwards the job holds nothing but the [N, D] features and N targets."""
    seen: list[tuple[int, set[int], int, bool]] = []
    bound = 0

    async def scenario(core: Core) -> None:
        nonlocal bound
        bound = worker_pixels()
        core.catalog.mark_store_read()
        config = FineTuneConfig(TINY, "pets", epochs=1)
        examples, labels = collect(core, config).finish()
        job = Job(id="memory", config=config, labels=labels, example_count=len(examples), examples=examples)
        del examples

        async def probe(job: Job, event: JobEvent) -> None:
            if event.kind == "features":
                done = int(event.message.split()[2].split("/")[0])
                seen.append((done, live_images(COUNT), live_pixels(), job.examples is None))

        pipeline = JobPipeline(core.dataplane, core.builtin, core.catalog, core.metrics, probe)
        features, targets = await pipeline.extract_features(job)
        assert features.shape == (COUNT, TINY_FEATURE_DIM)
        assert features.dtype == torch.float32  # a small job keeps them exact
        assert targets.tolist() == [index % 2 for index in range(COUNT)]  # "even" < "odd"
        assert job.examples is None and job.example_count == COUNT
        some = [0, FEATURE_CHUNK + 1, COUNT - 1]  # rows of the first, second and last chunks
        model = core.builtin.features_model(TINY)
        expected = await core.dataplane.infer_model(model, InferenceInput(images=[image(i) for i in some]))
        torch.testing.assert_close(features[some].float(), torch.from_numpy(expected), rtol=1e-2, atol=1e-3)
        # A decode thread may hold its last image a moment after its result is in (at most the
        # decode threads' count, of the last chunk); every earlier chunk's images must be gone.
        assert not live_images(COUNT) - set(range(LAST_CHUNK, COUNT)), "the job's images outlived their features"
        assert live_pixels() <= bound, "preprocessed pixels outlived their features"

    run_with_core(tmp_path / "store", scenario)
    assert [done for done, *_ in seen] == [min(COUNT, (i + 1) * FEATURE_CHUNK) for i in range(6)]
    for done, alive, pixels, released in seen:
        assert released, "the job object still holds its examples during extraction"
        chunk_start = (done - 1) // FEATURE_CHUNK * FEATURE_CHUNK
        assert not alive & set(range(chunk_start)), f"after {done} examples, images {sorted(alive)[:5]}... are held"
        assert pixels <= bound, f"after {done} examples, {pixels} images' pixels are still held"


def test_a_job_cancelled_while_training_or_extracting_leaves_no_features_behind(tmp_path: Path) -> None:
    """However a job ends, its [N, D] features are gone once its end is reported (the frames of the
    exception that ended it, in the event loop and in the training thread, do not keep them)."""

    async def scenario(core: Core) -> None:
        core.catalog.mark_store_read()
        for when in ("features", "epoch"):
            config = FineTuneConfig(TINY, f"pets-{when}", epochs=1000, validation_fraction=0.2)
            job = await new_job(core, config)
            async for event in core.jobs.watch(job.id):
                if event.kind == when:
                    await core.jobs.cancel(job.id)
            assert job.state is JobState.CANCELLED
            await asyncio.sleep(0)  # the job's task returns after its last event
            assert not live_features(COUNT), f"features of a job cancelled at {when} are still held"
            assert len(live_images(COUNT)) <= core.config.decode_thread_count  # see above
            assert live_pixels() <= worker_pixels()
        config = FineTuneConfig(TINY, "pets", epochs=2)
        job = await new_job(core, config)
        kinds = [event.kind async for event in core.jobs.watch(job.id)]
        assert kinds[-1] == "succeeded"
        await asyncio.sleep(0)
        assert not live_features(COUNT) and len(live_images(COUNT)) <= core.config.decode_thread_count

    run_with_core(tmp_path / "store", scenario)


def test_features_beyond_the_narrow_type_keep_float32_for_the_whole_job() -> None:
    features = torch.zeros((6, 2), dtype=FEATURE_DTYPE)
    features = put_rows(features, 0, torch.tensor([[1.5, 2.0], [3.0, 4.0]]))
    assert features.dtype == FEATURE_DTYPE
    features = put_rows(features, 2, torch.tensor([[1e6, -2.5e7]]))
    assert features.dtype == torch.float32
    features = put_rows(features, 3, torch.tensor([[0.1, 0.2]]))
    assert features[:4].tolist() == [[1.5, 2.0], [3.0, 4.0], [1e6, -2.5e7], [pytest.approx(0.1), pytest.approx(0.2)]]


def test_statistics_taken_a_slice_at_a_time_match_the_whole() -> None:
    """Mean and deviation of more rows than are taken at once equal those of the rows copied out."""
    generator = torch.Generator().manual_seed(3)
    values = torch.rand((2 * ROWS_AT_ONCE + 17, 6), generator=generator) * 100
    values[:, 2] = 5.0  # a constant column gets a deviation of 1
    rows = torch.randperm(len(values), generator=generator)[: 2 * ROWS_AT_ONCE + 1]
    mean, std = _statistics(values, rows)
    taken = values[rows]
    torch.testing.assert_close(mean, taken.mean(0), rtol=1e-5, atol=1e-4)
    expected = taken.std(0, unbiased=False)
    expected[2] = 1.0
    torch.testing.assert_close(std, expected, rtol=1e-5, atol=1e-4)


def test_the_allocator_threshold_is_fixed_unless_the_environment_sets_it() -> None:
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallopt"):
        pytest.skip("not glibc")
    settings = configure_allocator({})
    assert settings.mmap_threshold == MMAP_THRESHOLD_BYTES
    left = configure_allocator({THRESHOLD_VARIABLE: "65536"})
    assert left.mmap_threshold is None and THRESHOLD_VARIABLE in left.reason
    trim()  # callable at any time; whether it released anything depends on the heap
