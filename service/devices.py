"""Which devices a server computes on (``--device``) and with what dtype."""

from __future__ import annotations

import torch

from service.errors import FailedPreconditionError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype; reduced precision only where it pays off (CUDA)."""
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise FailedPreconditionError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}") from None
    return dtype if device.type == "cuda" else torch.float32


def device_label(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def _require_cuda(spec: str) -> None:
    if not torch.cuda.is_available():
        raise FailedPreconditionError(f"--device {spec!r}: CUDA is not available on this machine; use --device cpu")
