"""The CUDA path: pinned staging, non-blocking copies, reduced precision, channels_last.

Skipped where no GPU is visible; the same checks as the CPU tests otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.devices import resolve_devices, resolve_dtype
from service.models import WeightsSource, build_model, get_model_spec
from service.runtime import ModelInstance

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def alexnet() -> torch.nn.Module:
    return build_model(get_model_spec("alexnet"), WeightsSource.parse("random"))


def test_auto_uses_every_visible_gpu() -> None:
    devices = resolve_devices("auto")
    assert [d.type for d in devices] == ["cuda"] * torch.cuda.device_count()


@pytest.mark.parametrize(
    "dtype, channels_last, tolerance",
    [("float32", False, 1e-3), ("float32", True, 1e-3), ("float16", True, 3e-2), ("bfloat16", False, 6e-2)],
)
def test_cuda_instance_matches_cpu(alexnet, dtype: str, channels_last: bool, tolerance: float) -> None:
    device = torch.device("cuda", 0)
    cpu = ModelInstance.place(alexnet, torch.device("cpu"))
    gpu = ModelInstance.place(alexnet, device, dtype=resolve_dtype(dtype, device), channels_last=channels_last)
    parts = [torch.randn(3, 3, 224, 224), torch.randn(2, 3, 224, 224)]
    expected = cpu.forward(parts)
    for _ in range(2):  # the second pass reuses the pinned staging buffer
        got = gpu.forward(parts)
        assert got.dtype == np.float32 and got.shape == (5, 1000)
        assert np.abs(got - expected).max() / np.abs(expected).max() < tolerance
    staging = next(iter(gpu._staging.values()))
    assert staging.is_pinned()
    assert next(gpu.module.parameters()).device == device
