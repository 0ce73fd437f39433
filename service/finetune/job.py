"""What a fine-tuning job is: its state, its events, and the record kept once it ends."""

from __future__ import annotations

import asyncio
import enum
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from service.finetune.examples import TrainingExamples
from service.finetune.trainer import TrainMetrics
from vision_client.protocol import FineTuneConfig

if TYPE_CHECKING:
    from service.finetune.durable import Resumed


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    state: JobState
    kind: str  # queued, resumed, features, epoch, suspended, succeeded, failed, cancelled
    epoch: int = 0
    epochs: int = 0
    train_loss: float = math.nan
    validation_loss: float = math.nan
    validation_accuracy: float = math.nan
    eta_seconds: float = 0.0
    progress: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured: a point of the job's curve, kept in the job's record."""

    epoch: int
    train_loss: float
    validation_loss: float = math.nan  # nan without a validation split
    validation_accuracy: float = math.nan  # nan for regression or without a validation split

    @classmethod
    def of(cls, event: JobEvent) -> EpochMetrics:
        return cls(event.epoch, event.train_loss, event.validation_loss, event.validation_accuracy)

    def to_json(self) -> dict[str, float | int | None]:
        """JSON has no NaN: figures not measured are null."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: object) -> EpochMetrics:
        """Read back :meth:`to_json`; wrong types are refused (ValueError)."""
        if not isinstance(data, dict):
            raise ValueError("an epoch's metrics must be an object")
        epoch = data.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError("an epoch's metrics need an integer epoch")
        figures: list[float] = []
        for name in ("train_loss", "validation_loss", "validation_accuracy"):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} of epoch {epoch} must be a number, got {type(value).__name__}")
            figures.append(math.nan if value is None else float(value))
        return cls(epoch, *figures)


@dataclass
class Job:
    """A job. ``examples`` is released (None) when feature extraction takes them (it then lets each
    chunk's images go as their features come in), or when the job ends; ``example_count`` stays."""

    id: str
    config: FineTuneConfig
    labels: list[str]  # output names: class names, or target_0..T-1 for regression
    example_count: int
    examples: TrainingExamples | None = None
    state: JobState = JobState.QUEUED
    error: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    metrics: TrainMetrics = field(default_factory=TrainMetrics)
    events: list[JobEvent] = field(default_factory=list)
    curve: list[EpochMetrics] = field(default_factory=list)  # one per epoch event, in order
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    # Surviving a restart (service.finetune.durable): whether the store holds the job (kept) and its
    # training inputs (inputs_kept); where a job claimed from the store goes on from (resumed); why
    # it stops without ending here: its server stops (suspending) or another replica took it (lost).
    kept: bool = False
    inputs_kept: bool = False
    resumed: Resumed | None = None
    suspending: bool = False
    lost: bool = False

    def final_event(self) -> JobEvent:
        """The event that ends the job (for records read back without their events)."""
        last = self.events[-1] if self.events else None
        message = self.error if self.state is JobState.FAILED else (last.message if last else self.state.value)
        return JobEvent(
            self.id,
            self.state,
            self.state.value,
            epoch=self.metrics.epochs_run,
            epochs=self.config.epochs,
            train_loss=self.metrics.train_loss,
            validation_loss=self.metrics.validation_loss,
            validation_accuracy=self.metrics.validation_accuracy,
            progress=1.0 if self.state is JobState.SUCCEEDED else (last.progress if last else 0.0),
            message=message,
        )
