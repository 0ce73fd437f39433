"""ONNX Runtime: the exported network on the CPU, or on CUDA through its CUDA execution provider."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from service.config import ONNXRUNTIME, SPIN_ALWAYS, SPIN_NEVER, SPIN_RUN
from service.errors import FailedPreconditionError
from service.host.cpus import usable_cores
from service.runtimes.base import Output, gather_on_host
from service.runtimes.export import INPUT

# The session options behind --runtime-spin: busy-wait at all ("1") or sleep ("0"), and, when they
# busy-wait, stop doing so as soon as the last concurrent run returns ("1").
SPINNING = "session.intra_op.allow_spinning"
STOP_SPINNING_AFTER_RUN = "session.force_spinning_stop"


def available() -> bool:
    """Installed? (Without importing it: a server that does not use it should not pay for it.)"""
    return importlib.util.find_spec("onnxruntime") is not None


def version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


class OnnxRuntimeBackend:
    """One ``InferenceSession`` (thread-safe: handles share it)."""

    runtime = ONNXRUNTIME
    dtype = torch.float32
    precision = "float32"  # its CPU kernels have no bfloat16 path on x86; float16 needs a converted graph

    def __init__(self, session: object, device: torch.device) -> None:
        self._session = session
        self.device = device

    @staticmethod
    def require(device: torch.device) -> None:
        """Raise what stops ONNX Runtime from running on ``device`` here, if anything does."""
        if not available():
            raise FailedPreconditionError(
                "--runtime onnxruntime: onnxruntime is not installed; pip install onnxruntime, or use --runtime torch"
            )
        import onnxruntime as ort

        if device.type == "cuda" and not has_cuda():
            raise FailedPreconditionError(
                f"--runtime onnxruntime on {device}: the installed onnxruntime {ort.__version__} has no "
                f"CUDAExecutionProvider (it has {', '.join(ort.get_available_providers())}); install "
                "onnxruntime-gpu built for this CUDA, or use --runtime torch (the default on CUDA)"
            )
        if device.type not in ("cpu", "cuda"):
            raise FailedPreconditionError(f"--runtime onnxruntime does not run on {device}")

    @classmethod
    def load(cls, path: Path, device: torch.device, *, threads: int, spin: str = SPIN_ALWAYS) -> OnnxRuntimeBackend:
        """A session for the ONNX file at ``path``; ``threads`` intra-op threads (0: one per usable core),
        which busy-wait for work as ``spin`` says (``service.runtimes.base.SPIN_CHOICES``)."""
        cls.require(device)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry(SPINNING, "0" if spin == SPIN_NEVER else "1")
        options.add_session_config_entry(STOP_SPINNING_AFTER_RUN, "1" if spin == SPIN_RUN else "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
        # Without its arena a session gives each run's activations back: with it the server kept
        # 1.2 GiB more after a batch of 32 per model, for no speed measured (bench/README.md).
        options.enable_cpu_mem_arena = False
        providers: list[object] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        return cls(session, device)

    @property
    def threads(self) -> int:
        """Intra-op threads of one forward pass (1: the caller's thread alone, no pool)."""
        return int(self._session.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]

    @property
    def spin(self) -> str:
        """When the session's intra-op threads busy-wait for work (one of ``SPIN_CHOICES``)."""
        options = self._session.get_session_options()  # type: ignore[attr-defined]
        if options.get_session_config_entry(SPINNING) == "0":
            return SPIN_NEVER
        return SPIN_RUN if options.get_session_config_entry(STOP_SPINNING_AFTER_RUN) == "1" else SPIN_ALWAYS

    def share(self) -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(self._session, self.device)

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return gather_on_host(parts)

    def run(self, batch: torch.Tensor, output: Output) -> torch.Tensor:
        (result,) = self._session.run([output], {INPUT: batch.numpy()})  # type: ignore[attr-defined]
        return torch.from_numpy(result)
