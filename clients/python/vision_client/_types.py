"""The values the client returns: plain frozen dataclasses, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass

from vision_client.protocol.fine_tuning import FineTuneConfig


@dataclass(frozen=True)
class Prediction:
    """One class of one image: its label, its index in the model's outputs, its probability."""

    label: str
    index: int
    score: float  # softmax probability over all of the model's classes


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about one model (``vision.v1.Models``)."""

    name: str
    state: str  # LOADING, READY or UNAVAILABLE
    reason: str  # why it is not ready, when it is not
    platform: str  # "pytorch_torchvision" for built-in models, "vision_finetuned" for heads
    base_model: str | None  # the backbone of a fine-tuned head; None for built-in models
    input_size: int  # side of the square an image is resized and cropped to
    num_classes: int  # outputs per image
    labels: tuple[str, ...]  # class names in output order; empty if asked without labels
    min_height: int  # smallest PIXELS height the network accepts
    min_width: int
    runtime: str = ""  # what runs the network: torch, onnxruntime or openvino (comma-separated per device)
    version: str = ""  # the version that answers requests ("1" for built-in models)
    devices: tuple[str, ...] = ()  # where its instances run: "cpu", "cuda:0", ...
    pending_images: int = 0  # images waiting in its queue
    # The versions a request may name, oldest first ("1" for built-in models; a fine-tuned model's
    # versions kept in the store, the served one included): Client.rollback_model and version= take them.
    versions: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.state == "READY"


# -- fine-tuning ---------------------------------------------------------------------------
# Numbers the server did not measure (validation figures without a validation split, accuracy
# of a regression head, losses of events other than "epoch") arrive as 0.0: proto3 doubles
# have no "absent".

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    """One step of a fine-tuning job, as ``watch_job`` and ``on_event`` see it.

    ``kind`` is ``queued``, ``features`` (the backbone's features of a chunk of the
    examples are computed), ``epoch`` (one per training epoch, with its losses), or the
    terminal ``succeeded``, ``failed`` or ``cancelled`` (``message`` says why). A job whose
    server stops ends its stream with ``suspended`` (watch it again: it goes on at the next
    start of a server sharing the store, whose stream replays the epochs before the stop,
    then ``resumed``).
    """

    job_id: str
    kind: str
    state: str  # one of JOB_STATES
    epoch: int  # the epoch just finished (epoch events), or the last one run
    epochs: int  # the epochs asked for
    train_loss: float
    validation_loss: float
    validation_accuracy: float  # fraction right on the validation split (cross_entropy only)
    eta_seconds: float  # estimated time left
    progress: float  # fraction of the job done, 0 to 1
    message: str

    @property
    def terminal(self) -> bool:
        """Whether the job ended with this event (no more follow)."""
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class ClassMetrics:
    """How a finished job's head did on one class's validation examples (cross_entropy)."""

    label: str
    precision: float  # of the examples predicted as this class, the share that are (0 when none is)
    recall: float  # of this class's examples, the share predicted as it (0 when it has none)
    support: int  # validation examples of this class


@dataclass(frozen=True)
class ConfusionCell:
    """``count`` validation examples of class ``actual`` were predicted as ``predicted`` (indices into labels)."""

    actual: int
    predicted: int
    count: int


@dataclass(frozen=True)
class JobMetrics:
    """How a finished job's head did, at the epoch it kept (``best_epoch``).

    For cross_entropy, ``class_metrics`` holds each class's precision, recall and support on the
    validation split, in the order of the job's labels, and ``confusion`` the validation split's
    confusion matrix as its cells that are not zero (:meth:`confusion_matrix` makes it dense).
    """

    train_loss: float
    validation_loss: float
    validation_accuracy: float  # cross_entropy only
    best_epoch: int  # the epoch with the lowest validation loss (the last one without validation)
    epochs_run: int  # fewer than asked when early stopping ended the job
    train_examples: int
    validation_examples: int
    train_seconds: float
    class_metrics: tuple[ClassMetrics, ...] = ()
    confusion: tuple[ConfusionCell, ...] = ()

    def confusion_matrix(self) -> list[list[int]]:
        """Rows (actual class) of columns (predicted class), one per entry of ``class_metrics``."""
        size = len(self.class_metrics)
        rows = [[0] * size for _ in range(size)]
        for cell in self.confusion:
            if 0 <= cell.actual < size and 0 <= cell.predicted < size:
                rows[cell.actual][cell.predicted] = cell.count
        return rows


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch of a job measured (a point of its training curve)."""

    epoch: int
    train_loss: float
    validation_loss: float
    validation_accuracy: float  # cross_entropy only


@dataclass(frozen=True)
class JobInfo:
    """A fine-tuning job as the server describes it (``vision.v1.FineTuning/GetJob``)."""

    id: str
    state: str  # one of JOB_STATES
    base_model: str
    output_model: str
    head: str  # linear, two_layer, parallel, or custom (a list of layers)
    optimizer: str  # adam or sgd
    loss: str  # cross_entropy or mse
    epochs: int
    error: str  # why it failed, when it did
    examples: int
    labels: tuple[str, ...]  # the new model's output names: class names, or target_0... for mse
    metrics: JobMetrics
    created_at: float  # Unix seconds
    started_at: float | None
    finished_at: float | None
    # The job's whole config, read by the protocol's one conversion (None if it does not read:
    # a kind this client does not know). The fields above are its most used parts.
    config: FineTuneConfig | None = None
    # Each epoch trained on the validation split, in order (kept once the job ends).
    epoch_metrics: tuple[EpochMetrics, ...] = ()

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or was cancelled)."""
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class FineTuneResult:
    """What ``fine_tune`` returns once the job has ended, however it ended."""

    job_id: str
    output_model: str
    state: str  # succeeded, failed or cancelled
    error: str  # why it failed; empty unless state is "failed"
    metrics: JobMetrics
    labels: tuple[str, ...]
    events: tuple[JobEvent, ...]  # every event of the job, in order
    job: JobInfo

    @property
    def succeeded(self) -> bool:
        """Whether the head was trained and is now served as ``output_model``."""
        return self.state == "succeeded"

    @property
    def epochs(self) -> tuple[JobEvent, ...]:
        """The ``epoch`` events, one per epoch run: the training curves."""
        return tuple(event for event in self.events if event.kind == "epoch")
