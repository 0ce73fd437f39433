"""What every runtime offers the server: run a batch, get logits or backbone features.

A *runtime* is the library that executes a model's network: eager PyTorch, or the
network exported once to ONNX and run by ONNX Runtime or OpenVINO. Each exported
network has two outputs, the logits and the backbone's features (the input of the
last layer), so that classification, feature extraction for fine-tuning and
fine-tuned heads (features, then a small torch head) all run through the same
compiled network.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

Output = Literal["logits", "features"]
LOGITS: Output = "logits"
FEATURES: Output = "features"


class Backend(Protocol):
    """One model's network on one device, as one runtime runs it."""

    @property
    def runtime(self) -> str:
        """``torch``, ``onnxruntime`` or ``openvino``."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """What it returns features in (and so what a fine-tuned head on them runs in): torch's
        ``--dtype``; float32 for exported networks, whatever they compute in."""
        ...

    @property
    def precision(self) -> str:
        """What it computes in (``--dtype``): ``float32``, ``bfloat16`` or ``float16``."""
        ...

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One batch, where :meth:`run` wants it, from ``parts`` (CPU float32 tensors [n, 3, H, W]).

        Apart from :meth:`run` so that the input copy is timed on its own (Triton's
        ``compute_input``).
        """
        ...

    def run(self, batch: torch.Tensor, output: Output) -> torch.Tensor:
        """The ``output`` of ``batch`` (from :meth:`gather`): a float tensor on :attr:`device`
        (torch) or on the host."""
        ...

    def share(self) -> Backend:
        """Another handle on the same weights, for use from another thread."""
        ...


def gather_on_host(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` as one contiguous float32 CPU batch (what exported networks take)."""
    batch = parts[0] if len(parts) == 1 else torch.cat(parts)
    return batch.to(torch.float32).contiguous()
