from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ("without_labels",)
    WITHOUT_LABELS_FIELD_NUMBER: _ClassVar[int]
    without_labels: bool
    def __init__(self, without_labels: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "state", "reason", "platform", "base_model", "input_size", "num_outputs", "labels", "min_height", "min_width", "runtime", "version", "devices", "pending_images", "precision", "precision_agreement", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MIN_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIN_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PENDING_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    reason: str
    platform: str
    base_model: str
    input_size: int
    num_outputs: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    min_height: int
    min_width: int
    runtime: str
    version: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    pending_images: int
    precision: str
    precision_agreement: PrecisionAgreement
    versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., platform: _Optional[str] = ..., base_model: _Optional[str] = ..., input_size: _Optional[int] = ..., num_outputs: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., min_height: _Optional[int] = ..., min_width: _Optional[int] = ..., runtime: _Optional[str] = ..., version: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., pending_images: _Optional[int] = ..., precision: _Optional[str] = ..., precision_agreement: _Optional[_Union[PrecisionAgreement, _Mapping]] = ..., versions: _Optional[_Iterable[str]] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class PrecisionAgreement(_message.Message):
    __slots__ = ("images", "images_source", "min_cosine", "mean_cosine", "top1", "max_relative_error")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    MEAN_COSINE_FIELD_NUMBER: _ClassVar[int]
    TOP1_FIELD_NUMBER: _ClassVar[int]
    MAX_RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    images: int
    images_source: str
    min_cosine: float
    mean_cosine: float
    top1: float
    max_relative_error: float
    def __init__(self, images: _Optional[int] = ..., images_source: _Optional[str] = ..., min_cosine: _Optional[float] = ..., mean_cosine: _Optional[float] = ..., top1: _Optional[float] = ..., max_relative_error: _Optional[float] = ...) -> None: ...

class GetThroughputRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceImages(_message.Message):
    __slots__ = ("model", "device", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    images: int
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., images: _Optional[int] = ...) -> None: ...

class QueueDepth(_message.Message):
    __slots__ = ("model", "pending_images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PENDING_IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    pending_images: int
    def __init__(self, model: _Optional[str] = ..., pending_images: _Optional[int] = ...) -> None: ...

class Throughput(_message.Message):
    __slots__ = ("time", "images", "queues")
    TIME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    time: float
    images: _containers.RepeatedCompositeFieldContainer[DeviceImages]
    queues: _containers.RepeatedCompositeFieldContainer[QueueDepth]
    def __init__(self, time: _Optional[float] = ..., images: _Optional[_Iterable[_Union[DeviceImages, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[QueueDepth, _Mapping]]] = ...) -> None: ...
