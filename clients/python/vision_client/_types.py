"""The values the client returns: plain frozen dataclasses, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def ready(self) -> bool:
        return self.state == "READY"
