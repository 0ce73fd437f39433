"""A job's training examples: collected as they stream in, within limits, and checked.

Everything a job holds counts toward its byte limit: image bytes, label bytes and
target values. Images are checked one at a time from their headers and decoded at
reduced size where the format allows (JPEG), so that a job of large photographs never
holds more than one decoded image at once.

The images of a job that names a dataset (:mod:`.datasets`) are not uploaded: its listing goes
through the same collector (:meth:`ExampleCollector.add_listed`: the same limits, the same words,
each error naming the file), and the job reads them when it runs, a chunk at a time. Feature
extraction takes either kind of job's images from :meth:`TrainingExamples.source`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.config import FineTuneLimits
from service.errors import InvalidInputError, quote
from service.finetune.spec import check_classes, examples_limit_message, max_examples
from service.inference.preprocess import ImageDecoder
from vision_client.protocol import FineTuneConfig
from vision_client.protocol.labels import label_problem

CHECK_SIZE = 64  # side a JPEG is decoded to (at least) when it is only checked
_TARGET_BYTES = 4  # a float32 target value
_EXAMPLE_OVERHEAD = 64  # bookkeeping bytes counted per example, so that empty labels are not free


class ImageSource(Protocol):
    """Where feature extraction takes a job's encoded images from, in order, a chunk at a time."""

    def chunks(self, size: int) -> AsyncIterator[list[bytes]]:
        """The images, at most ``size`` at a time; each chunk is the caller's alone."""

    async def refused(
        self, first: int, chunk: list[bytes], error: InvalidInputError, decoder: ImageDecoder, pool: Executor
    ) -> InvalidInputError:
        """The error to end the job with when the model refused ``chunk`` (examples ``first``...) with ``error``."""


@dataclass(frozen=True)
class TrainingExamples:
    images: list[bytes]  # uploaded; empty where ``dataset`` reads them
    labels: list[str] | None = None  # class name per example (cross_entropy)
    targets: np.ndarray | None = None  # [N, T] float32 (mse)
    dataset: ImageSource | None = None  # the images of a dataset, read when the job runs

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.images)

    def source(self) -> ImageSource:
        """The images for feature extraction. An upload's are handed over: the source holds them, not
        these examples, and lets each chunk go once it is taken (drop the examples to free them)."""
        return self.dataset if self.dataset is not None else UploadedImages(self.images)


class UploadedImages:
    """An upload's images, let go chunk by chunk as extraction takes them."""

    def __init__(self, images: list[bytes]) -> None:
        self._pending = deque(images)

    async def chunks(self, size: int) -> AsyncIterator[list[bytes]]:
        pending = self._pending
        while pending:
            yield [pending.popleft() for _ in range(min(size, len(pending)))]

    async def refused(
        self, first: int, chunk: list[bytes], error: InvalidInputError, decoder: ImageDecoder, pool: Executor
    ) -> InvalidInputError:
        return InvalidInputError(f"examples {first}-{first + len(chunk) - 1}: {error.message}")


class ExampleCollector:
    """Accumulates streamed examples, enforcing the limits as they arrive."""

    def __init__(self, config: FineTuneConfig, limits: FineTuneLimits) -> None:
        self._config = config
        self._limits = limits
        self._images: list[bytes] = []
        self._labels: list[str] = []
        self._classes: set[str] = set()
        self._targets: list[list[float]] = []
        self._bytes = 0
        self._listed = 0  # images of a dataset's listing (add_listed), whose bytes the job reads later

    def add(self, image: bytes, label: str, target: Sequence[float]) -> None:
        index = len(self._images)
        self._admit(index, f"example {index}", f"example {index}'s", len(image), label, target)
        self._images.append(image)

    def add_listed(self, where: str, size: int, label: str) -> None:
        """An image of a dataset, ``size`` bytes of class ``label`` as its listing names it (``where``:
        its URL or path, for messages); its bytes are read when the job runs."""
        self._admit(self._listed, where, f"{where}: its", size, label, ())
        self._listed += 1

    def _admit(self, index: int, where: str, whose: str, size: int, label: str, target: Sequence[float]) -> None:
        """Count one example (``where``: "example 3", or a dataset's file; ``whose``: "example 3's")."""
        limits = self._limits
        if index >= max_examples(self._config, limits):
            raise InvalidInputError(examples_limit_message(self._config, limits))
        if not size:
            raise InvalidInputError(f"{where} has no image bytes")
        label_bytes = len(label.encode("utf-8", "surrogatepass"))
        self._bytes += size + label_bytes + _TARGET_BYTES * len(target) + _EXAMPLE_OVERHEAD
        if self._bytes > limits.max_total_bytes:
            raise InvalidInputError(
                f"the examples (images, labels and targets) exceed {limits.max_total_bytes} bytes in all "
                "(--max-job-bytes); "
                "send fewer or smaller images"
            )
        if self._config.loss == "cross_entropy":
            if not label:
                raise InvalidInputError(f"{where} has no label; cross_entropy needs a class name per example")
            # The one rule for class names (vision_client.protocol.labels), which the model store's
            # reader and the web console apply too.
            problem = label_problem(label, limits.max_label_length)
            if problem is not None:
                raise InvalidInputError(f"{whose} label {quote(label)} {problem}")
            if label not in self._classes:
                if len(self._classes) >= limits.max_labels:
                    raise InvalidInputError(
                        f"example {index} brings class {len(self._classes) + 1}; a job takes at most "
                        f"{limits.max_labels} classes (--max-labels)"
                    )
                self._classes.add(label)
            self._labels.append(label)
        else:
            if not target:
                raise InvalidInputError(f"{where} has no target; mse needs a vector of floats per example")
            if len(target) > limits.max_target_size:
                raise InvalidInputError(f"{whose} target is longer than {limits.max_target_size}")
            if self._targets and len(target) != len(self._targets[0]):
                raise InvalidInputError(
                    f"{whose} target has {len(target)} values but earlier ones have {len(self._targets[0])}"
                )
            if not all(math.isfinite(v) for v in target):
                raise InvalidInputError(f"{whose} target has a value that is not finite")
            self._targets.append(list(target))

    def finish(self) -> tuple[TrainingExamples, list[str]]:
        """The examples and the output names (sorted class names, or target_i); a dataset's examples
        hold their labels, and their images are the dataset's to read (see :mod:`.datasets`)."""
        count = self._listed or len(self._images)
        if count < 2:
            raise InvalidInputError(f"a job needs at least 2 examples, got {count}")
        if self._config.loss == "cross_entropy":
            classes = sorted(self._classes)
            if len(classes) < 2:
                raise InvalidInputError(
                    f"all examples have the label {quote(classes[0])}; a classifier needs at least 2 classes"
                )
            check_classes(self._config, classes)
            return TrainingExamples(self._images, labels=self._labels), classes
        targets = np.asarray(self._targets, dtype=np.float32)
        return TrainingExamples(self._images, targets=targets), [f"target_{i}" for i in range(targets.shape[1])]


async def check_images(decoder: ImageDecoder, images: Sequence[bytes], pool: Executor) -> None:
    """Refuse the job at CreateJob if an example is not an image the model's decoder takes.

    One image at a time, through the serving decoder, at reduced size where the format
    allows: the pixels are thrown away (feature extraction decodes again, through the
    batched path), so only one decoded image is alive at any moment.
    """
    loop = asyncio.get_running_loop()
    for index, data in enumerate(images):
        try:
            await loop.run_in_executor(pool, decoder.check, data, index, CHECK_SIZE)
        except InvalidInputError as exc:
            raise InvalidInputError(f"example {index}: {exc.message}") from exc
