"""OpenVINO: the exported network compiled for the CPU."""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.config import OPENVINO
from service.errors import FailedPreconditionError
from service.host.cpus import usable_cores
from service.runtimes.base import Output, gather_on_host

# --dtype -> OpenVINO's INFERENCE_PRECISION_HINT on the CPU (whether the CPU has bf16 is devices' to say).
INFERENCE_PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}


def available() -> bool:
    """Installed? (Without importing it: a server that does not use it should not pay for it.)"""
    return importlib.util.find_spec("openvino") is not None


def version() -> str:
    import openvino

    return str(openvino.__version__).split("-")[0]


@functools.cache
def _core() -> Any:
    import openvino

    return openvino.Core()  # one per process, as OpenVINO recommends


class OpenVinoBackend:
    """A compiled model; each thread gets an infer request of its own (they are not thread-safe)."""

    runtime = OPENVINO
    dtype = torch.float32  # of its outputs, whatever it computes in

    def __init__(self, compiled: Any, device: torch.device, precision: str = "float32") -> None:
        self._compiled = compiled
        self.device = device
        self.precision = precision
        self._local = threading.local()

    @staticmethod
    def require(device: torch.device) -> None:
        """Raise what stops OpenVINO from running on ``device`` here, if anything does."""
        if device.type != "cpu":
            raise FailedPreconditionError(
                f"--runtime openvino runs on the CPU only, not on {device}; use --runtime torch or onnxruntime there"
            )
        if not available():
            raise FailedPreconditionError(
                "--runtime openvino: openvino is not installed; pip install openvino, or use --runtime onnxruntime"
            )

    @classmethod
    def load(
        cls, path: Path, device: torch.device, *, threads: int, cache_dir: Path | None, precision: str = "float32"
    ) -> OpenVinoBackend:
        """Compile the ONNX file at ``path`` for the CPU in ``precision`` (float32 is pinned: OpenVINO
        would pick bf16 by itself on CPUs that have it), tuned for latency; ``threads`` 0: one per
        usable core."""
        cls.require(device)
        if precision not in INFERENCE_PRECISIONS:
            raise FailedPreconditionError(
                f"--runtime openvino computes {', '.join(INFERENCE_PRECISIONS)} on the CPU, not {precision}"
            )
        properties: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
            "INFERENCE_NUM_THREADS": threads or usable_cores(),
        }
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            properties["CACHE_DIR"] = str(cache_dir)
        core = _core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", properties)
        return cls(compiled, device, precision)

    @property
    def compiled_precision(self) -> str:
        """What the compiled network computes in, as OpenVINO says: ``f32`` or ``bf16``."""
        return str(self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string())

    def share(self) -> OpenVinoBackend:
        return OpenVinoBackend(self._compiled, self.device, self.precision)

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return gather_on_host(parts)

    def run(self, batch: torch.Tensor, output: Output) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        request.infer({0: batch.numpy()})
        # The request reuses its output buffers: copy before the next batch overwrites them.
        return torch.from_numpy(np.array(request.get_tensor(self._compiled.output(output)).data, copy=True))
