"""The wire contract of vision-serving, shared by the SDK and the server; torch-free.

- ``vision_client.protocol.stubs``: the generated protobuf and gRPC modules of ``protos/``
  (``stubs.inference.grpc_service_pb2``, ``stubs.vision.v1.fine_tuning_pb2``, ...);
- :mod:`~vision_client.protocol.tensors`: the tensor names and the BYTES framing;
- :mod:`~vision_client.protocol.fine_tuning`: the kinds of heads, optimizers and losses, the
  one :class:`FineTuneConfig` and its one conversion to and from the wire and JSON.
- :mod:`~vision_client.protocol.calls`: awaiting a grpc.aio client-streaming call so that a
  refusal keeps the server's status.

Everything named here is public: the server imports these names and nothing private of the SDK.
"""

from vision_client._version import __version__
from vision_client.protocol.fine_tuning import (
    CLASS_WEIGHT_MODES,
    HEAD_KINDS,
    HEAD_PRESETS,
    LAYER_KINDS,
    LOSSES,
    OPTIMIZER_KINDS,
    UINT64_MAX,
    AugmentationConfig,
    FineTuneConfig,
    HeadConfig,
    Layer,
    OptimizerConfig,
    format_layers,
    from_dict,
    from_message,
    parse_layers,
    to_dict,
    to_message,
    vocabulary,
)
from vision_client.protocol.tensors import (
    CLASSIFICATION,
    IMAGE,
    LOGITS,
    PIXELS,
    FramingError,
    decode_bytes_elements,
    encode_bytes_elements,
)

__all__ = [
    "CLASSIFICATION",
    "CLASS_WEIGHT_MODES",
    "HEAD_KINDS",
    "HEAD_PRESETS",
    "IMAGE",
    "LAYER_KINDS",
    "LOGITS",
    "LOSSES",
    "OPTIMIZER_KINDS",
    "PIXELS",
    "UINT64_MAX",
    "AugmentationConfig",
    "FineTuneConfig",
    "FramingError",
    "HeadConfig",
    "Layer",
    "OptimizerConfig",
    "__version__",
    "decode_bytes_elements",
    "encode_bytes_elements",
    "format_layers",
    "from_dict",
    "from_message",
    "parse_layers",
    "to_dict",
    "to_message",
    "vocabulary",
]
