from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState

class HeadSpec(_message.Message):
    __slots__ = ("kind", "hidden", "blocks", "dropout", "layers")
    KIND_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    hidden: int
    blocks: int
    dropout: float
    layers: _containers.RepeatedCompositeFieldContainer[HeadLayer]
    def __init__(self, kind: _Optional[str] = ..., hidden: _Optional[int] = ..., blocks: _Optional[int] = ..., dropout: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[HeadLayer, _Mapping]]] = ...) -> None: ...

class HeadLayer(_message.Message):
    __slots__ = ("kind", "width", "p", "branches", "combine")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    width: int
    p: float
    branches: _containers.RepeatedCompositeFieldContainer[HeadBranch]
    combine: str
    def __init__(self, kind: _Optional[str] = ..., width: _Optional[int] = ..., p: _Optional[float] = ..., branches: _Optional[_Iterable[_Union[HeadBranch, _Mapping]]] = ..., combine: _Optional[str] = ...) -> None: ...

class HeadBranch(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[HeadLayer]
    def __init__(self, layers: _Optional[_Iterable[_Union[HeadLayer, _Mapping]]] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("kind", "lr", "momentum", "weight_decay", "beta1", "beta2")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lr: float
    momentum: float
    weight_decay: float
    beta1: float
    beta2: float
    def __init__(self, kind: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ...) -> None: ...

class FineTuneConfig(_message.Message):
    __slots__ = ("base_model", "output_model", "head", "optimizer", "loss", "epochs", "batch_size", "validation_fraction", "seed", "early_stopping_patience", "replace", "refit", "augmentation", "class_weights", "dataset", "train_backbone_blocks", "backbone_lr_factor")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    REFIT_FIELD_NUMBER: _ClassVar[int]
    AUGMENTATION_FIELD_NUMBER: _ClassVar[int]
    CLASS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BACKBONE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_LR_FACTOR_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    output_model: str
    head: HeadSpec
    optimizer: OptimizerSpec
    loss: str
    epochs: int
    batch_size: int
    validation_fraction: float
    seed: int
    early_stopping_patience: int
    replace: bool
    refit: bool
    augmentation: AugmentationSpec
    class_weights: ClassWeightsSpec
    dataset: str
    train_backbone_blocks: int
    backbone_lr_factor: float
    def __init__(self, base_model: _Optional[str] = ..., output_model: _Optional[str] = ..., head: _Optional[_Union[HeadSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., loss: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., validation_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., early_stopping_patience: _Optional[int] = ..., replace: _Optional[bool] = ..., refit: _Optional[bool] = ..., augmentation: _Optional[_Union[AugmentationSpec, _Mapping]] = ..., class_weights: _Optional[_Union[ClassWeightsSpec, _Mapping]] = ..., dataset: _Optional[str] = ..., train_backbone_blocks: _Optional[int] = ..., backbone_lr_factor: _Optional[float] = ...) -> None: ...

class AugmentationSpec(_message.Message):
    __slots__ = ("views", "crop", "crop_scale_min", "crop_scale_max", "horizontal_flip")
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    CROP_SCALE_MIN_FIELD_NUMBER: _ClassVar[int]
    CROP_SCALE_MAX_FIELD_NUMBER: _ClassVar[int]
    HORIZONTAL_FLIP_FIELD_NUMBER: _ClassVar[int]
    views: int
    crop: bool
    crop_scale_min: float
    crop_scale_max: float
    horizontal_flip: bool
    def __init__(self, views: _Optional[int] = ..., crop: _Optional[bool] = ..., crop_scale_min: _Optional[float] = ..., crop_scale_max: _Optional[float] = ..., horizontal_flip: _Optional[bool] = ...) -> None: ...

class ClassWeightsSpec(_message.Message):
    __slots__ = ("mode", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    weights: _containers.ScalarMap[str, float]
    def __init__(self, mode: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("image", "label", "target")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    label: str
    target: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, image: _Optional[bytes] = ..., label: _Optional[str] = ..., target: _Optional[_Iterable[float]] = ...) -> None: ...

class ExampleBatch(_message.Message):
    __slots__ = ("examples",)
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    def __init__(self, examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("config", "examples")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    config: FineTuneConfig
    examples: ExampleBatch
    def __init__(self, config: _Optional[_Union[FineTuneConfig, _Mapping]] = ..., examples: _Optional[_Union[ExampleBatch, _Mapping]] = ...) -> None: ...

class JobMetrics(_message.Message):
    __slots__ = ("train_loss", "validation_loss", "validation_accuracy", "best_epoch", "epochs_run", "train_examples", "validation_examples", "train_seconds", "class_metrics", "confusion_matrix")
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BEST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_RUN_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_METRICS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    train_loss: float
    validation_loss: float
    validation_accuracy: float
    best_epoch: int
    epochs_run: int
    train_examples: int
    validation_examples: int
    train_seconds: float
    class_metrics: _containers.RepeatedCompositeFieldContainer[ClassMetrics]
    confusion_matrix: _containers.RepeatedCompositeFieldContainer[ConfusionCell]
    def __init__(self, train_loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., validation_accuracy: _Optional[float] = ..., best_epoch: _Optional[int] = ..., epochs_run: _Optional[int] = ..., train_examples: _Optional[int] = ..., validation_examples: _Optional[int] = ..., train_seconds: _Optional[float] = ..., class_metrics: _Optional[_Iterable[_Union[ClassMetrics, _Mapping]]] = ..., confusion_matrix: _Optional[_Iterable[_Union[ConfusionCell, _Mapping]]] = ...) -> None: ...

class ClassMetrics(_message.Message):
    __slots__ = ("precision", "recall", "support")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    precision: float
    recall: float
    support: int
    def __init__(self, precision: _Optional[float] = ..., recall: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class ConfusionCell(_message.Message):
    __slots__ = ("actual", "predicted", "count")
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    actual: int
    predicted: int
    count: int
    def __init__(self, actual: _Optional[int] = ..., predicted: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class EpochMetrics(_message.Message):
    __slots__ = ("epoch", "train_loss", "validation_loss", "validation_accuracy")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    train_loss: float
    validation_loss: float
    validation_accuracy: float
    def __init__(self, epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., validation_accuracy: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "config", "error", "examples", "labels", "metrics", "created_at", "started_at", "finished_at", "epoch_metrics")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_METRICS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    config: FineTuneConfig
    error: str
    examples: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    metrics: JobMetrics
    created_at: float
    started_at: float
    finished_at: float
    epoch_metrics: _containers.RepeatedCompositeFieldContainer[EpochMetrics]
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., config: _Optional[_Union[FineTuneConfig, _Mapping]] = ..., error: _Optional[str] = ..., examples: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Union[JobMetrics, _Mapping]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., epoch_metrics: _Optional[_Iterable[_Union[EpochMetrics, _Mapping]]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "state", "kind", "epoch", "epochs", "train_loss", "validation_loss", "validation_accuracy", "eta_seconds", "progress", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    kind: str
    epoch: int
    epochs: int
    train_loss: float
    validation_loss: float
    validation_accuracy: float
    eta_seconds: float
    progress: float
    message: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., kind: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., train_loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., validation_accuracy: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
