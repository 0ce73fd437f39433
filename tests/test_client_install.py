"""The SDK installs from its directory into a fresh virtual environment, without torch or Pillow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDK = ROOT / "clients" / "python"

CHECK = """
import sys

import numpy as np

import vision_client
from vision_client import AsyncClient, Client
from vision_client._images import encode_images

assert vision_client.__version__ == VERSION, vision_client.__version__
for heavy in ("torch", "torchvision", "PIL"):
    assert heavy not in sys.modules, heavy + " was imported"
# Arrays are encoded without Pillow.
(png,) = encode_images(np.zeros((4, 5, 3), dtype=np.uint8))
assert png.startswith(bytes([0x89]) + b"PNG")
Client("localhost:1").close()
# A job's config, and its one conversion to the wire.
from vision_client import FineTuneConfig, HeadConfig
from vision_client.protocol import from_message, to_message

config = FineTuneConfig("a", "b", head=HeadConfig("parallel", blocks=3))
assert to_message(config).head.blocks == 3
assert from_message(to_message(config)).head == config.head
print("ok")
"""


def run(*command: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_installs_and_imports_without_torch(tmp_path: Path) -> None:
    # A copy, so that building leaves nothing in the checkout.
    source = shutil.copytree(SDK, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source)

    installed = run(python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check").stdout.lower()
    names = {line.split("==")[0] for line in installed.split()}
    assert {"vision-client", "grpcio", "protobuf", "numpy"} <= names
    assert not names & {"torch", "torchvision", "pillow"}

    version = (SDK / "vision_client" / "VERSION").read_text().strip()
    assert run(python, "-c", f"VERSION = {version!r}\n" + CHECK).stdout.strip() == "ok"
    assert run(venv / "bin" / "vision-client", "--version").stdout.strip() == f"vision-client {version}"
    # The generated stubs, their type stubs and the py.typed marker are in the wheel.
    files = run(python, "-m", "pip", "show", "--files", "--disable-pip-version-check", "vision-client").stdout
    assert "vision_client/py.typed" in files
    assert "vision_client/VERSION" in files
    assert "vision_client/protocol/stubs/inference/grpc_service_pb2.pyi" in files
