"""The server's configuration, built once in ``main()`` and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODELS: tuple[str, ...] = ("alexnet", "vgg16", "resnet101")


@dataclass(frozen=True)
class BatchingConfig:
    """How each model's queue turns requests into batches."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 512  # images waiting per model before RESOURCE_EXHAUSTED

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


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
    decode_threads: int = 0  # 0: one per CPU core
    max_image_pixels: int = 40_000_000  # decoded width*height cap (decompression bombs)
    max_request_images: int | None = None  # images in one request; None: the queue size
    max_stream_in_flight: int = 64  # requests of one ModelStreamInfer call being worked on at once (>= a batch)
    max_message_bytes: int = 64 * 1024 * 1024
    model_store: Path | None = None  # None: fine-tuning is off
    store_poll_seconds: float = 5.0
    auth_token_file: Path | None = None
    drain_seconds: float = 25.0
    log_level: str = "INFO"

    @property
    def decode_thread_count(self) -> int:
        """Threads of the decode pool (``decode_threads``, else one per CPU core)."""
        return self.decode_threads or os.cpu_count() or 1

    @property
    def request_images_limit(self) -> int:
        """Most images one request may carry (``max_request_images``, else the queue size)."""
        return self.max_request_images or self.batching.max_queue_size
