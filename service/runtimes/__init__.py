"""Runtimes that run the networks: eager PyTorch, ONNX Runtime and OpenVINO (``--runtime``).

``base`` defines what a runtime offers (:class:`~service.runtimes.base.Backend`); one module per
runtime implements it; ``export`` turns a network into a cached ONNX file; ``select`` picks
the runtime for a model and device and builds its backend.
"""

from service.config import RUNTIME_CHOICES, RUNTIMES
from service.runtimes.base import Backend

__all__ = ["RUNTIMES", "RUNTIME_CHOICES", "Backend"]
