"""KServe's ``InferenceGRPCClient`` and ``InferenceRESTClient`` (kserve 0.21) against a real server.

kserve pulls in far more than this project needs (pandas, fastapi, the Kubernetes client...),
so it lives in a virtual environment of its own, ``.venv-kserve``, which ``make test`` builds
(``make kserve-venv``); this test runs a client script with that environment's python. Without
it the test skips, and fails under CI, where ``make test`` must have built it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.conftest import ROOT

KSERVE_PYTHON = Path(os.environ.get("VISION_KSERVE_PYTHON", ROOT / ".venv-kserve" / "bin" / "python"))


@pytest.fixture(scope="module")
def kserve_python() -> Path:
    if not KSERVE_PYTHON.exists():
        message = f"{KSERVE_PYTHON} is missing: `make kserve-venv` builds the kserve environment"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return KSERVE_PYTHON


def _inputs(photos, tmp_path: Path, *, seed: int) -> tuple[Path, np.ndarray]:
    """A photo and two random PIXELS images, written where the client script reads them."""
    image = tmp_path / "photo.jpg"
    image.write_bytes(photos["china-crop"])
    pixels = np.random.default_rng(seed).standard_normal((2, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    return image, pixels


def _run_client(kserve_python: Path, script: str, url: str, tmp_path: Path) -> tuple[dict, np.lib.npyio.NpzFile]:
    """Run a client script of tests/kserve/ with kserve's python; its JSON report and its logits."""
    out = tmp_path / "logits.npz"
    result = subprocess.run(
        [str(kserve_python), str(ROOT / "tests" / "kserve" / script), url, "alexnet",
         str(tmp_path / "photo.jpg"), str(tmp_path / "pixels.npy"), str(out)],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # kserve's environment alone
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def test_kserve_grpc_client_works_unchanged(kserve_python: Path, serve_inprocess, photos, tmp_path: Path) -> None:
    server = serve_inprocess()
    image, pixels = _inputs(photos, tmp_path, seed=3)
    report, logits = _run_client(kserve_python, "client.py", server.target, tmp_path)

    assert report["server_live"] and report["server_ready"] and report["model_ready"]
    assert report["image_raw_sent_raw"] and report["pixels_raw_sent_raw"]
    assert not report["image_typed_sent_raw"] and not report["pixels_typed_sent_raw"]
    for name, rows in (("image_raw", 1), ("image_typed", 1), ("pixels_raw", 2), ("pixels_typed", 2)):
        assert report[f"{name}_output"] == ["LOGITS", "FP32", [rows, 1000], name]

    # The same answers as tritonclient gets for the same inputs.
    with triton.InferenceServerClient(server.target) as client:
        tensor = triton.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image.read_bytes()], dtype=np.object_))
        expected_image = client.infer("alexnet", [tensor]).as_numpy("LOGITS")
        tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        expected_pixels = client.infer("alexnet", [tensor]).as_numpy("LOGITS")
    for name in ("image_raw", "image_typed"):
        np.testing.assert_allclose(logits[name], expected_image, rtol=1e-4, atol=1e-4)
    for name in ("pixels_raw", "pixels_typed"):
        np.testing.assert_allclose(logits[name], expected_pixels, rtol=1e-4, atol=1e-4)


def test_kserve_rest_client_works_unchanged(kserve_python: Path, serve_inprocess, photos, tmp_path: Path) -> None:
    server = serve_inprocess()
    image, pixels = _inputs(photos, tmp_path, seed=4)
    report, logits = _run_client(kserve_python, "rest_client.py", server.http_url, tmp_path)
    assert report["server_live"] and report["server_ready"] and report["model_ready"]
    for name, rows in (("image_binary", 1), ("pixels_binary", 2), ("pixels_json", 2)):
        assert report[f"{name}_output"] == ["LOGITS", "FP32", [rows, 1000], name]

    with triton.InferenceServerClient(server.target) as client:
        tensor = triton.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image.read_bytes()], dtype=np.object_))
        np.testing.assert_array_equal(logits["image_binary"], client.infer("alexnet", [tensor]).as_numpy("LOGITS"))
        tensor = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        expected = client.infer("alexnet", [tensor]).as_numpy("LOGITS")
    for name in ("pixels_binary", "pixels_json"):
        np.testing.assert_allclose(logits[name], expected, rtol=1e-5, atol=1e-5)
