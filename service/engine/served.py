"""A served model as the data plane sees it: metadata, state, queue and the workers behind it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.batching import BatchQueue
from service.engine.precision import Precision
from service.engine.runtime import InferenceWorker, ModelInstance
from service.inference.preprocess import ImageDecoder

BUILTIN_PLATFORM = "pytorch_torchvision"
FINETUNED_PLATFORM = "vision_finetuned"
FEATURES_SUFFIX = ":features"


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ServedModel:
    name: str
    labels: list[str]
    num_outputs: int
    input_size: int  # side of the square IMAGE preprocessing produces
    min_size: tuple[int, int]  # smallest PIXELS height and width
    platform: str
    decoder: ImageDecoder
    queue: BatchQueue
    base_model: str | None = None
    version: str = "1"  # Triton's version: built-in models "1", fine-tuned ones their number in the store
    # A fine-tuned model's versions that requests and rollbacks may name (those the store keeps,
    # this one included), and this version's id in the store (service.finetune.store).
    versions: tuple[str, ...] = ()
    revision: str = ""
    state: ModelState = ModelState.LOADING
    reason: str = ""
    workers: list[InferenceWorker] = field(default_factory=list)
    # Unloaded on request (RepositoryModelUnload) or never loaded since: such a model does
    # not count against the server's readiness.
    unloaded: bool = False
    # What it computes in (--dtype) and that precision's agreement with float32; set when it is built.
    precision: Precision = field(default_factory=Precision)
    # The runtime cache's entries its instances were built from (service.runtimes.export): leased
    # while it is served, so that no collector deletes them.
    exports: tuple[Path, ...] = ()

    @property
    def available_versions(self) -> list[str]:
        """The versions a request may ask for, oldest first: the kept ones, or this one."""
        return list(self.versions or (self.version,))

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def instances(self) -> list[ModelInstance]:
        return [worker.instance for worker in self.workers]

    @property
    def runtimes(self) -> dict[str, str]:
        """Device label -> the runtime that runs this model there (empty until it is built)."""
        return {instance.label: instance.runtime for instance in self.instances}

    @property
    def runtime(self) -> str:
        """The runtime(s) running this model, comma-separated; empty until it is built."""
        return ",".join(dict.fromkeys(self.runtimes.values()))
