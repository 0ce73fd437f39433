"""Python client of vision-serving: classify images with torchvision models over gRPC.

    from vision_client import Client

    with Client("localhost:8001") as client:
        for prediction in client.classify("cat.jpg", model="resnet101")[0]:
            print(prediction.label, prediction.score)

``AsyncClient`` has the same methods as coroutines. Errors are
:class:`VisionClientError` subclasses (see :mod:`vision_client.errors`).
"""

from vision_client._client import USE_CLIENT_DEFAULT, AsyncClient, Client
from vision_client._images import ImageInput
from vision_client._retry import Retry
from vision_client._types import ModelInfo, Prediction
from vision_client._version import __version__
from vision_client.errors import (
    AuthenticationError,
    ClientClosedError,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    VisionClientError,
)

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ClientClosedError",
    "DeadlineExceededError",
    "ImageInput",
    "InvalidInputError",
    "ModelInfo",
    "ModelNotFoundError",
    "Prediction",
    "ResourceExhaustedError",
    "Retry",
    "UnavailableError",
    "VisionClientError",
    "__version__",
]
