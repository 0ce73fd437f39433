"""Which runtime runs a model on a device (``--runtime``), and building its backend.

``auto`` takes the runtime measured fastest for the device kind among those installed:
on CPUs ONNX Runtime, then OpenVINO, then PyTorch (bench/README.md has the figures); on
CUDA PyTorch, which has float16 and ``--channels-last``. ``fastest`` builds every
installed runtime for the model, times a few batches of each at load and keeps the
fastest.

Precision counts only where a reduced one is asked (``--dtype``): then both rules keep to the
runtimes that compute it natively on the device kind (:data:`PRECISIONS`), ``auto`` in
:data:`REDUCED_PREFERENCE`'s order (OpenVINO's bfloat16 first on CPUs: docs/benchmarks.md), and a
runtime named outright that cannot is refused with the ones that can.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from service.config import AUTO, FASTEST, FLOAT32, ONNXRUNTIME, OPENVINO, RUNTIME_CHOICES, SPIN_ALWAYS, TORCH
from service.engine.devices import DTYPES, NAMES
from service.errors import FailedPreconditionError
from service.models import ModelSpec
from service.runtimes import onnxruntime_backend, openvino_backend
from service.runtimes.base import LOGITS, Backend
from service.runtimes.export import ExportCache, state_digest
from service.runtimes.onnxruntime_backend import OnnxRuntimeBackend
from service.runtimes.openvino_backend import OpenVinoBackend
from service.runtimes.torch_backend import TorchBackend

log = logging.getLogger(__name__)

# The order auto prefers on each device kind: fastest first (measured, see bench/README.md).
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": (ONNXRUNTIME, OPENVINO, TORCH),
    "cuda": (TORCH,),
}
# What each runtime computes natively on each device kind (whether the device itself has the
# precision is service.engine.devices.native_precisions's to say). ONNX Runtime's CPU kernels have no
# bfloat16 path on x86 and its float16 needs a converted graph: float32 only.
PRECISIONS: dict[str, dict[str, tuple[str, ...]]] = {
    TORCH: {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "float16", "bfloat16")},
    ONNXRUNTIME: {"cpu": ("float32",), "cuda": ("float32",)},
    OPENVINO: {"cpu": ("float32", "bfloat16")},
}
# auto's order where a reduced precision is asked.
REDUCED_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": (OPENVINO, TORCH),
    "cuda": (TORCH,),
}
FASTEST_BATCH = 4  # images per timed batch for --runtime fastest
FASTEST_RUNS = 3


@dataclass(frozen=True)
class RuntimeOptions:
    """How backends are built: from ``--runtime``, ``--runtime-cache``, ``--runtime-threads``,
    and the torch-only ``--channels-last``; the precision (``--dtype``, per model and checked per
    device) is :meth:`BackendLoader.load`'s argument."""

    runtime: str
    cache_dir: Path
    threads: int = 0  # of each instance (RuntimeConfig.instance_threads)
    lone_threads: int | None = None  # of a batch that runs alone (RuntimeConfig.lone_threads)
    spin: str = SPIN_ALWAYS  # ONNX Runtime's intra-op spinning (SPIN_CHOICES); its own default
    channels_last: bool = False


def installed(device: torch.device) -> list[str]:
    """Runtimes that can run on ``device`` here, in ``auto``'s order of preference."""
    usable = []
    for name in (ONNXRUNTIME, OPENVINO, TORCH):
        if name == TORCH:
            usable.append(name)
        elif name == ONNXRUNTIME and onnxruntime_backend.available():
            if device.type == "cpu" or onnxruntime_backend.has_cuda():
                usable.append(name)
        elif name == OPENVINO and device.type == "cpu" and openvino_backend.available():
            usable.append(name)
    return usable


def computes(runtime: str, device: torch.device, precision: str) -> bool:
    """Does ``runtime`` compute ``precision`` natively on ``device``'s kind?"""
    return precision in PRECISIONS.get(runtime, {}).get(device.type, ())


def candidates(requested: str, device: torch.device, precision: str = FLOAT32, *, asked: str = "") -> list[str]:
    """The runtimes to build for ``device`` in ``precision``: one, or several for ``fastest`` to
    time. ``asked``: how ``--dtype`` named the precision, for messages."""
    if requested not in RUNTIME_CHOICES:
        raise FailedPreconditionError(f"--runtime {requested!r}: choose one of {', '.join(RUNTIME_CHOICES)}")
    usable = installed(device)
    if precision == FLOAT32:
        if requested == AUTO:
            return [next(name for name in PREFERENCE.get(device.type, (TORCH,)) if name in usable)]
        if requested == FASTEST:
            return usable
        return [requested]  # load explains why one cannot run here
    able = [name for name in usable if computes(name, device, precision)]
    if requested in (AUTO, FASTEST):
        if requested == AUTO:
            able = [name for name in REDUCED_PREFERENCE.get(device.type, (TORCH,)) if name in able][:1]
        if able:
            return able
        raise FailedPreconditionError(
            f"--dtype {asked or precision}: no installed runtime computes {precision} on {device.type} "
            f"(installed: {', '.join(usable)}); use --dtype {FLOAT32}"
        )
    if not computes(requested, device, precision):
        raise FailedPreconditionError(_cannot_compute(requested, device, precision, asked, able))
    return [requested]


def _cannot_compute(runtime: str, device: torch.device, precision: str, asked: str, able: list[str]) -> str:
    native = ", ".join(PRECISIONS.get(runtime, {}).get(device.type, ())) or "nothing"
    instead = (
        f"use --runtime {' or '.join(able)} (they compute it there), or"
        if able
        else "no installed runtime computes it there: use"
    )
    return (
        f"--runtime {runtime} computes {native} only on {device.type}, not {asked or precision} "
        f"(it has no native {precision} path); {instead} --dtype {FLOAT32}"
    )


class BackendLoader:
    """Builds backends of one network (one model's weights) for any runtime and device."""

    def __init__(self, spec: ModelSpec, net: torch.nn.Module, options: RuntimeOptions) -> None:
        self._spec = spec
        self._net = net
        self._options = options
        self._cache = ExportCache(options.cache_dir)
        self._onnx: Path | None = None
        self._digest: str | None = None

    @property
    def export_entry(self) -> Path | None:
        """The runtime cache's entry the backends were built from; None before any export is used."""
        return None if self._onnx is None else self._onnx.parent

    def load(self, runtime: str, device: torch.device, dtype: torch.dtype, *, threads: int | None = None) -> Backend:
        """A backend of the network computing in ``dtype``; ``threads`` overrides the options'
        intra-op threads."""
        threads = self._options.threads if threads is None else threads
        precision = NAMES[dtype]
        if runtime in PRECISIONS and not computes(runtime, device, precision):
            able = [name for name in installed(device) if computes(name, device, precision)]
            raise FailedPreconditionError(_cannot_compute(runtime, device, precision, "", able))
        if runtime == TORCH:
            return TorchBackend.place(
                self._spec,
                self._net,
                device,
                dtype=dtype,
                channels_last=self._options.channels_last,
                threads=threads or None,
            )
        # Check that the runtime can run here before exporting: an export takes seconds to minutes.
        if runtime == ONNXRUNTIME:
            OnnxRuntimeBackend.require(device)
            return self._load_exported(
                lambda path: OnnxRuntimeBackend.load(path, device, threads=threads, spin=self._options.spin)
            )
        if runtime == OPENVINO:
            OpenVinoBackend.require(device)

            def compile_openvino(path: Path) -> Backend:
                # The export is float32 whatever the precision; OpenVINO's compiled blobs are not.
                blobs = path.parent / f"openvino-{openvino_backend.version()}-{precision}"
                return OpenVinoBackend.load(path, device, threads=threads, cache_dir=blobs, precision=precision)

            return self._load_exported(compile_openvino)
        raise FailedPreconditionError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIME_CHOICES)}")

    def lone_backend(self, first: Backend) -> Backend | None:
        """A backend like ``first`` on every core (``lone_threads``), for a batch that runs while no
        other instance computes, or None where ``first`` already has them (or is not on a CPU)."""
        if self._options.lone_threads is None or first.device.type != "cpu":
            return None
        if isinstance(first, TorchBackend):  # one module: the count is the calling thread's
            return first.on_threads(self._options.lone_threads)
        return self.load(first.runtime, first.device, DTYPES[first.precision], threads=self._options.lone_threads)

    def instances_of(self, first: Backend, count: int) -> list[Backend]:
        """``first`` and ``count - 1`` more backends like it, for instances that run batches at once.

        They share ``first``'s weights where running at once on them costs nothing: on CUDA and in
        torch (one module on one device), and in ONNX Runtime when each runs on one thread (a
        session without an intra-op pool runs concurrent calls each on its caller's thread).
        Otherwise each is a session or compiled network of its own, with its own threads: two
        concurrent runs on one session's pool of 2 threads were slower than one run alone
        (AlexNet on 2 cores, bench/README.md), and an OpenVINO network compiled for latency runs
        one request at a time."""
        if count == 1:
            return [first]
        one_thread = isinstance(first, OnnxRuntimeBackend) and first.threads == 1
        if first.device.type == "cuda" or first.runtime == TORCH or one_thread:
            return [first, *(first.share() for _ in range(count - 1))]
        dtype = DTYPES[first.precision]
        return [first, *(self.load(first.runtime, first.device, dtype) for _ in range(count - 1))]

    def _load_exported(self, load: Callable[[Path], Backend]) -> Backend:
        if self._onnx is None:
            self._onnx = self._export()
        try:
            return load(self._onnx)
        except FailedPreconditionError:
            raise
        except Exception as exc:
            log.warning("%s: the runtime cannot load %s (%s); exporting again", self._spec.name, self._onnx, exc)
            self._cache.discard(self._onnx.parent)
            self._onnx = self._export()
            return load(self._onnx)

    def _export(self) -> Path:
        """The cached export of the network (made now if missing); the weights are hashed once
        (seconds for VGG16), however often the entry must be made again."""
        if self._digest is None:
            self._digest = state_digest(self._net)
        return self._cache.onnx_file(self._spec, self._net, self._digest)


def time_backend(backend: Backend, side: int, *, batch: int = FASTEST_BATCH, runs: int = FASTEST_RUNS) -> float:
    """Median seconds per image of ``runs`` batches (after one untimed batch)."""
    parts = [torch.zeros(batch, 3, side, side)]
    backend.run(backend.gather(parts), LOGITS)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        backend.run(backend.gather(parts), LOGITS)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] / batch
