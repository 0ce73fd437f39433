"""The benchmark's inputs: real photographs, JPEG-encoded, and the requests made of them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photographs() -> list[tuple[str, bytes]]:
    """Real photographs, JPEG quality 90: scikit-learn's two (427x640) and a few crops of each."""
    from sklearn.datasets import load_sample_images

    photos = []
    for name, pixels in zip(("china", "flower"), load_sample_images().images, strict=True):
        full = Image.fromarray(pixels)
        w, h = full.size
        photos.append((name, encode_jpeg(full)))
        photos.append(
            (f"{name}-center", encode_jpeg(full.crop((w // 2 - 180, h // 2 - 150, w // 2 + 180, h // 2 + 150))))
        )
        photos.append((f"{name}-left", encode_jpeg(full.crop((0, 0, 400, 380)))))
        photos.append(
            (f"{name}-right", encode_jpeg(full.crop((w - 320, h - 300, w, h)).transpose(Image.FLIP_LEFT_RIGHT)))
        )
    return photos


def request_payloads(mode: str, jpegs: list[bytes], pixels: list) -> list[np.ndarray]:  # pixels: torch tensors
    """One single-image request body per input: a JPEG (IMAGE) or a [1,3,H,W] tensor (PIXELS)."""
    if mode == "image":
        return [np.array([jpeg], dtype=np.object_) for jpeg in jpegs]
    return [tensor.unsqueeze(0).numpy().astype(np.float32, copy=False) for tensor in pixels]


def infer_input(module: object, mode: str, payload: np.ndarray) -> object:
    """``payload`` as a tritonclient ``InferInput`` of ``module`` (tritonclient.grpc or .aio)."""
    if mode == "image":
        tensor = module.InferInput("IMAGE", [len(payload)], "BYTES")  # type: ignore[attr-defined]
    else:
        tensor = module.InferInput("PIXELS", list(payload.shape), "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(payload)
    return tensor
