"""Python client of vision-serving: classify images with torchvision models over gRPC, fine-tune heads.

    from vision_client import Client, FineTuneConfig

    with Client("localhost:8001") as client:
        for prediction in client.classify("cat.jpg", model="resnet101")[0]:
            print(prediction.label, prediction.score)

        config = FineTuneConfig(base_model="resnet101", output_model="pets")
        result = client.fine_tune(config, examples=[("cat.jpg", "cat"), ...])

``AsyncClient`` has the same methods as coroutines. Errors are
:class:`VisionClientError` subclasses (see :mod:`vision_client.errors`).
"""

from vision_client._client import USE_CLIENT_DEFAULT, AsyncClient, Client
from vision_client._images import ImageInput
from vision_client._retry import Retry
from vision_client._types import (
    ClassMetrics,
    ConfusionCell,
    EpochMetrics,
    FineTuneResult,
    JobEvent,
    JobInfo,
    JobMetrics,
    ModelInfo,
    Prediction,
)
from vision_client._version import __version__
from vision_client.errors import (
    AlreadyExistsError,
    AuthenticationError,
    ClientClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    VisionClientError,
)
from vision_client.protocol.fine_tuning import AugmentationConfig, FineTuneConfig, HeadConfig, Layer, OptimizerConfig

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AlreadyExistsError",
    "AsyncClient",
    "AugmentationConfig",
    "AuthenticationError",
    "ClassMetrics",
    "Client",
    "ClientClosedError",
    "ConfusionCell",
    "DeadlineExceededError",
    "EpochMetrics",
    "FailedPreconditionError",
    "FineTuneConfig",
    "FineTuneResult",
    "HeadConfig",
    "ImageInput",
    "InvalidInputError",
    "JobEvent",
    "JobInfo",
    "JobMetrics",
    "Layer",
    "ModelInfo",
    "ModelNotFoundError",
    "OptimizerConfig",
    "Prediction",
    "ResourceExhaustedError",
    "Retry",
    "UnavailableError",
    "VisionClientError",
    "__version__",
]
