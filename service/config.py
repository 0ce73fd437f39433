"""The server's configuration, built once in ``main()`` and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODELS: tuple[str, ...] = ("alexnet", "vgg16", "resnet101")


@dataclass(frozen=True)
class BatchingConfig:
    """How each model's queue turns requests into batches."""

    max_batch_size: int = 32
    # 0, as Triton: a free worker takes whatever is queued. Measured (bench/README.md): +14-25%
    # images/s at one client against 5 ms, no loss at 8 and 32, where batches fill while one runs.
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 512  # images waiting per model before RESOURCE_EXHAUSTED

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Which runtime runs the networks, where exported networks are cached, and its threads."""

    name: str = "auto"  # auto, torch, onnxruntime, openvino, fastest (service.runtimes.base)
    cache_dir: Path | None = None  # None: $XDG_CACHE_HOME/vision-serving/runtimes
    threads: int = 0  # intra-op threads of the runtime; 0: one per core


@dataclass(frozen=True)
class ServeConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    models: tuple[str, ...] = DEFAULT_MODELS
    weights: str = "pretrained"  # "pretrained", "random" or a directory of <model>.pth
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:0,cuda:1"
    dtype: str = "float32"  # compute dtype on CUDA: float32, float16, bfloat16
    channels_last: bool = False
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    decode_threads: int = 0  # 0: one per CPU core
    max_image_pixels: int = 40_000_000  # decoded width*height cap (decompression bombs)
    max_message_bytes: int = 64 * 1024 * 1024
    model_store: Path | None = None  # None: fine-tuning is off
    store_poll_seconds: float = 5.0
    auth_token_file: Path | None = None
    drain_seconds: float = 25.0
    log_level: str = "INFO"
