"""The CUDA path: pinned staging, non-blocking copies, reduced precision, channels_last, and the
runtimes on CUDA (``auto`` keeps PyTorch; ``onnxruntime`` through its CUDA execution provider).

Skipped where no GPU is visible; run with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.config import ONNXRUNTIME, TORCH
from service.engine.devices import resolve_devices, resolve_dtype
from service.engine.runtime import ModelInstance
from service.errors import FailedPreconditionError
from service.models import WeightsSource, build_model, get_model_spec
from service.runtimes.select import BackendLoader, RuntimeOptions, candidates
from service.runtimes.torch_backend import TorchBackend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SPEC = get_model_spec("alexnet")


@pytest.fixture(scope="module")
def alexnet() -> torch.nn.Module:
    return build_model(SPEC, WeightsSource.parse("random"))


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_auto_uses_every_visible_gpu_and_torch_there() -> None:
    devices = resolve_devices("auto")
    assert [d.type for d in devices] == ["cuda"] * torch.cuda.device_count()
    assert candidates("auto", devices[0]) == [TORCH]


@pytest.mark.parametrize(
    "dtype, channels_last, tolerance",
    [("float32", False, 1e-3), ("float32", True, 1e-3), ("float16", True, 3e-2), ("bfloat16", False, 6e-2)],
)
def test_cuda_instance_matches_cpu(alexnet, dtype: str, channels_last: bool, tolerance: float) -> None:
    device = torch.device("cuda", 0)
    cpu = ModelInstance(TorchBackend.place(SPEC, alexnet, torch.device("cpu")))
    backend = TorchBackend.place(SPEC, alexnet, device, dtype=resolve_dtype(dtype, device), channels_last=channels_last)
    gpu = ModelInstance(backend)
    parts = [torch.randn(3, 3, 224, 224), torch.randn(2, 3, 224, 224)]
    expected = cpu.forward(parts)
    for _ in range(2):  # the second pass reuses the pinned staging buffer
        got = gpu.forward(parts)
        assert got.dtype == np.float32 and got.shape == (5, 1000)
        assert relative_error(got, expected) < tolerance
    staging = next(iter(backend._staging.values()))
    assert staging.is_pinned()
    assert next(backend.features.parameters()).device == device
    # Fine-tuned heads run on the GPU on the backbone's features, in the same dtype.
    head = torch.nn.Linear(4096, 3)
    with torch.inference_mode():
        features = torch.from_numpy(cpu.features().forward(parts))
        assert relative_error(gpu.with_head(head).forward(parts), head(features).numpy()) < tolerance * 10


def test_onnxruntime_on_cuda_uses_its_cuda_provider_or_says_why_not(alexnet, tmp_path: Path) -> None:
    import onnxruntime

    device = torch.device("cuda", 0)
    loader = BackendLoader(SPEC, alexnet, RuntimeOptions(ONNXRUNTIME, tmp_path / "cache"))
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(FailedPreconditionError, match=r"CUDAExecutionProvider.*--runtime torch"):
            loader.load(ONNXRUNTIME, device, torch.float32)
        return
    instance = ModelInstance(loader.load(ONNXRUNTIME, device, torch.float32))
    assert instance.runtime == ONNXRUNTIME and instance.label == "cuda:0"
    parts = [torch.randn(4, 3, 224, 224)]
    with torch.inference_mode():
        expected = alexnet(parts[0]).numpy()
    got = instance.forward(parts)
    assert relative_error(got, expected) < 1e-3
    session = instance.backend._session  # type: ignore[attr-defined]
    assert session.get_providers()[0] == "CUDAExecutionProvider"
