"""Which devices a server computes on (``--device``), and the precisions each computes natively (``--dtype``).

:func:`native_precisions` is the one capability probe: float32 everywhere; bfloat16 on CPUs whose
flags have ``avx512_bf16`` or ``amx_bf16`` and on GPUs that support it; float16 on GPUs only. A
precision a device lacks is refused, never emulated (emulated bfloat16 is slower than float32).
The CPU's flags come from ``/proc/cpuinfo``; tests (and a person checking the refusal) may set
``VISION_SERVING_CPU_FLAGS`` to a space-separated list that replaces them (:data:`CPU_FLAGS_ENV`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from service.config import FLOAT32
from service.errors import FailedPreconditionError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# Flags of x86 CPUs that compute bfloat16 natively: AVX-512 BF16 dot products, AMX tiles.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_FLAGS_ENV = "VISION_SERVING_CPU_FLAGS"  # a test hook: these flags instead of /proc/cpuinfo's
CPUINFO = Path("/proc/cpuinfo")


def resolve_devices(spec: str) -> list[torch.device]:
    """``auto``: every visible GPU, else the CPU; or ``cpu``, ``cuda``, ``cuda:0,cuda:1``."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [torch.device("cpu")]
    if spec == "cpu":
        return [torch.device("cpu")]
    if spec == "cuda":
        _require_cuda(spec)
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = []
    for part in spec.split(","):
        try:
            device = torch.device(part.strip())
        except RuntimeError as exc:
            raise FailedPreconditionError(f"--device {spec!r}: {part!r} is not a device ({exc})") from exc
        if device.type == "cuda":
            _require_cuda(spec)
            index = 0 if device.index is None else device.index
            if index >= torch.cuda.device_count():
                raise FailedPreconditionError(
                    f"--device {spec!r}: cuda:{index} does not exist; {torch.cuda.device_count()} GPU(s) are visible"
                )
            device = torch.device("cuda", index)
        elif device.type != "cpu":
            raise FailedPreconditionError(f"--device {spec!r}: only cpu and cuda devices are supported")
        devices.append(device)
    if len(set(devices)) != len(devices):
        raise FailedPreconditionError(f"--device {spec!r} names a device twice")
    return devices


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read), or those
    :data:`CPU_FLAGS_ENV` names."""
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return frozenset(override.replace(",", " ").split())
    try:
        with CPUINFO.open(encoding="ascii", errors="replace") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_precisions(device: torch.device) -> tuple[str, ...]:
    """The precisions ``device`` computes natively, float32 first (the one capability probe)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return ("float32", "float16", "bfloat16") if major >= 8 else ("float32", "float16")
    if cpu_flags() & set(NATIVE_BF16_FLAGS):
        return ("float32", "bfloat16")
    return ("float32",)


def resolve_dtype(name: str, device: torch.device, *, asked: str | None = None) -> torch.dtype:
    """The torch dtype of precision ``name`` on ``device``; FailedPreconditionError, saying what the
    device offers, where it does not compute it natively. ``asked``: how ``--dtype`` named it."""
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise FailedPreconditionError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}") from None
    offered = native_precisions(device)
    if name in offered:
        return dtype
    label = "the CPU" if device.type == "cpu" else device_label(device)
    if device.type == "cpu" and name == "float16":
        why = "float16 is served on GPUs only"
    elif device.type == "cpu":
        why = f"its flags have neither {' nor '.join(NATIVE_BF16_FLAGS)}; emulated, bfloat16 is slower than float32"
    else:
        why = f"{label} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}) lacks it"
    if len(offered) > 1:
        example = f"{FLOAT32},resnet101={offered[-1]}"
        offers = f"it offers {', '.join(offered)}: choose one of those (per model: --dtype {example})"
    else:
        offers = f"it offers {FLOAT32} only: use --dtype {FLOAT32}"
    raise FailedPreconditionError(
        f"--dtype {asked or name}: {label} does not compute {name} natively ({why}); {offers}"
    )


def device_label(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def _require_cuda(spec: str) -> None:
    if not torch.cuda.is_available():
        raise FailedPreconditionError(f"--device {spec!r}: CUDA is not available on this machine; use --device cpu")
