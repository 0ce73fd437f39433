#!/usr/bin/env python3
"""What decoding one IMAGE costs a decode thread: the server's decoder (Pillow and numpy, written
straight into its row of the batch) against the way it decoded before, Pillow's decode followed
by torchvision's ``weights.transforms()`` and a copy into the row, on one thread each.

    .venv/bin/python -m bench.decode_cost [--model alexnet] [--rounds 7] [--json out.json]

The two are timed in alternating rounds over the same encoded images (real photographs, JPEG;
one upscaled to 1920x1280; a greyscale JPEG; a PNG) and checked to give equal tensors. Figures:
the median over rounds of the mean CPU time of the decoding thread per image, in milliseconds.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from bench.inputs import encode_jpeg, photographs
from service.inference.preprocess import ImageDecoder
from service.models import get_model_spec
from service.models.preprocessing import preprocessing_of

MAX_PIXELS = 40_000_000  # the server's default --max-image-pixels


def inputs() -> dict[str, list[bytes]]:
    photos = [data for _, data in photographs()]
    china = Image.open(io.BytesIO(photos[0])).convert("RGB")
    large = china.resize((1920, 1280), Image.Resampling.BICUBIC)
    png = io.BytesIO()
    china.save(png, format="PNG")
    return {
        "photos 640x427 and crops (JPEG)": photos,
        "1920x1280 (JPEG)": [encode_jpeg(large)],
        "greyscale 640x427 (JPEG)": [encode_jpeg(china.convert("L"))],
        "640x427 (PNG)": [png.getvalue()],
    }


def timed(decode: Callable[[bytes, int], None], images: list[bytes], repeat: int) -> float:
    """Mean CPU seconds of this thread per image."""
    start = time.thread_time()
    for _ in range(repeat):
        for index, data in enumerate(images):
            decode(data, index)
    return (time.thread_time() - start) / (repeat * len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images-per-round", type=int, default=40, help="decodes per input class and round")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as the server's decode threads run torch
    transform = get_model_spec(args.model).transforms()
    decoder = ImageDecoder(preprocessing_of(transform), max_pixels=MAX_PIXELS)
    side = decoder.shape[-1]

    results = {}
    for label, images in inputs().items():
        rows = np.empty((len(images), 3, side, side), dtype=np.float32)
        tensor_rows = torch.empty((len(images), 3, side, side), dtype=torch.float32)

        def before(data: bytes, index: int, tensor_rows: torch.Tensor = tensor_rows) -> None:
            with torch.inference_mode():
                tensor_rows[index].copy_(transform(decoder.decode(data, index)))

        def after(data: bytes, index: int, rows: np.ndarray = rows) -> None:
            decoder(data, index, rows[index])

        for index, data in enumerate(images):
            before(data, index)
            after(data, index)
        if not torch.equal(torch.from_numpy(rows), tensor_rows):
            raise SystemExit(f"{label}: the two decoders disagree")
        repeat = max(1, args.images_per_round // len(images))
        figures: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.rounds):  # alternating, so that a busy moment costs both alike
            figures["before"].append(timed(before, images, repeat))
            figures["after"].append(timed(after, images, repeat))
        before_ms = statistics.median(figures["before"]) * 1000
        after_ms = statistics.median(figures["after"]) * 1000
        results[label] = {"before_ms": before_ms, "after_ms": after_ms, "after_over_before": after_ms / before_ms}
        print(
            f"{label:34s} before {before_ms:7.2f} ms  after {after_ms:7.2f} ms  after/before {after_ms / before_ms:.2f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"model": args.model, "rounds": args.rounds, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
