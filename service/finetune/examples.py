"""A job's training examples: collected as they stream in, within limits, and checked.

Everything a job holds counts toward its byte limit: image bytes, label bytes and
target values. Images are checked one at a time from their headers and decoded at
reduced size where the format allows (JPEG), so that a job of large photographs never
holds more than one decoded image at once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.config import FineTuneLimits
from service.errors import InvalidInputError, quote
from service.finetune.spec import check_classes, examples_limit_message, max_examples
from service.preprocess import ImageDecoder
from vision_client.protocol import FineTuneConfig
from vision_client.protocol.labels import label_problem

CHECK_SIZE = 64  # side a JPEG is decoded to (at least) when it is only checked
_TARGET_BYTES = 4  # a float32 target value
_EXAMPLE_OVERHEAD = 64  # bookkeeping bytes counted per example, so that empty labels are not free


@dataclass(frozen=True)
class TrainingExamples:
    images: list[bytes]
    labels: list[str] | None = None  # class name per example (cross_entropy)
    targets: np.ndarray | None = None  # [N, T] float32 (mse)

    def __len__(self) -> int:
        return len(self.images)


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

    def add(self, image: bytes, label: str, target: Sequence[float]) -> None:
        index = len(self._images)
        limits = self._limits
        if index >= max_examples(self._config, limits):
            raise InvalidInputError(examples_limit_message(self._config, limits))
        if not image:
            raise InvalidInputError(f"example {index} has no image bytes")
        label_bytes = len(label.encode("utf-8", "surrogatepass"))
        self._bytes += len(image) + label_bytes + _TARGET_BYTES * len(target) + _EXAMPLE_OVERHEAD
        if self._bytes > limits.max_total_bytes:
            raise InvalidInputError(
                f"the examples (images, labels and targets) exceed {limits.max_total_bytes} bytes in all "
                "(--max-job-bytes); "
                "send fewer or smaller images"
            )
        if self._config.loss == "cross_entropy":
            if not label:
                raise InvalidInputError(f"example {index} has no label; cross_entropy needs a class name per example")
            # The one rule for class names (vision_client.protocol.labels), which the model store's
            # reader and the web console apply too.
            problem = label_problem(label, limits.max_label_length)
            if problem is not None:
                raise InvalidInputError(f"example {index}'s label {quote(label)} {problem}")
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
                raise InvalidInputError(f"example {index} has no target; mse needs a vector of floats per example")
            if len(target) > limits.max_target_size:
                raise InvalidInputError(f"example {index}'s target is longer than {limits.max_target_size}")
            if self._targets and len(target) != len(self._targets[0]):
                raise InvalidInputError(
                    f"example {index}'s target has {len(target)} values but earlier ones have {len(self._targets[0])}"
                )
            if not all(math.isfinite(v) for v in target):
                raise InvalidInputError(f"example {index}'s target has a value that is not finite")
            self._targets.append(list(target))
        self._images.append(image)

    def finish(self) -> tuple[TrainingExamples, list[str]]:
        """The examples and the output names (sorted class names, or target_i)."""
        if len(self._images) < 2:
            raise InvalidInputError(f"a job needs at least 2 examples, got {len(self._images)}")
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
