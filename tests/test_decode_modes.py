"""Every pixel mode the decoder accepts comes out as the 8-bit rendering of the same picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import AlexNet_Weights

from service.errors import InvalidInputError
from service.inference.preprocess import ACCEPTED_MODES, ImageDecoder, to_rgb
from service.models.preprocessing import preprocessing_of
from tests.conftest import encode

TRANSFORM = AlexNet_Weights.DEFAULT.transforms()


@pytest.fixture()
def decoder() -> ImageDecoder:
    return ImageDecoder(preprocessing_of(TRANSFORM), max_pixels=4_000_000)


def grey8() -> np.ndarray:
    """An 8-bit picture with every level, 50 % grey among them."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (48, 1))
    ramp[:, :16] = 128
    return ramp


def colour8() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "RGB")


def assert_close(got: Image.Image, want: Image.Image, tolerance: int = 1) -> None:
    assert got.mode == "RGB" and got.size == want.size
    difference = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want.convert("RGB"), dtype=np.int16))
    assert difference.max() <= tolerance, difference.max()


def sixteen_bit(levels: np.ndarray) -> np.ndarray:
    return levels.astype(np.uint16) * 257  # 8-bit level k is 16-bit 257*k (0 -> 0, 255 -> 65535)


# -- encoded images: the modes the accepted formats produce -----------------------------------------


def test_16_bit_png_is_read_as_its_8_bit_rendering(decoder: ImageDecoder) -> None:
    levels = grey8()
    data = encode(Image.fromarray(sixteen_bit(levels)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decoder.decode(data)
    assert decoded.getpixel((0, 0)) == (128, 128, 128)  # 50 % grey stays grey (it was clipped to white)
    assert_close(decoded, Image.fromarray(levels, "L"), tolerance=0)
    assert torch.equal(torch.from_numpy(decoder(data)), TRANSFORM(Image.fromarray(levels, "L").convert("RGB")))


def test_16_bit_big_endian_png_is_read_as_its_8_bit_rendering(decoder: ImageDecoder) -> None:
    levels = grey8()
    big_endian = Image.frombytes(
        "I;16B", (levels.shape[1], levels.shape[0]), sixteen_bit(levels).astype(">u2").tobytes()
    )
    data = encode(big_endian, "PNG")
    assert_close(decoder.decode(data), Image.fromarray(levels, "L"), tolerance=0)


@pytest.mark.parametrize(
    "mode, fmt",
    [("1", "PNG"), ("1", "BMP"), ("L", "PNG"), ("L", "BMP"), ("LA", "PNG"), ("P", "PNG"), ("P", "GIF"),
     ("P", "BMP"), ("RGB", "BMP"), ("RGBA", "PNG"), ("RGBA", "WEBP")],
)  # fmt: skip
def test_lossless_modes_equal_pillows_8_bit_rendering(decoder: ImageDecoder, mode: str, fmt: str) -> None:
    picture = colour8().convert(mode)
    data = encode(picture, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert_close(decoder.decode(data), picture, tolerance=0)


def test_palette_with_transparency_keeps_its_colours(decoder: ImageDecoder) -> None:
    picture = colour8().convert("P")
    data = encode(picture, "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    assert_close(decoder.decode(data), picture, tolerance=0)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_jpeg_modes_equal_pillows_rendering(decoder: ImageDecoder, mode: str) -> None:
    data = encode(colour8().convert(mode), "JPEG", quality=95)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == mode
    assert_close(decoder.decode(data), opened.convert("RGB"), tolerance=0)


def test_cmyk_jpeg_is_close_to_the_rgb_picture(decoder: ImageDecoder) -> None:
    picture = Image.new("RGB", (32, 32), (200, 40, 90))
    data = encode(picture.convert("CMYK"), "JPEG", quality=100)
    assert_close(decoder.decode(data), picture, tolerance=3)  # JPEG rounding


# -- in memory: every accepted mode against its 8-bit equivalent -----------------------------------


def rendered(mode: str) -> tuple[Image.Image, Image.Image]:
    """(an image in ``mode``, the 8-bit picture it stands for)."""
    levels = grey8()
    size = (levels.shape[1], levels.shape[0])
    if mode in ("I;16", "I;16L", "I;16N"):
        return Image.frombytes(mode, size, sixteen_bit(levels).astype("<u2").tobytes()), Image.fromarray(levels, "L")
    if mode == "I;16B":
        return Image.frombytes(mode, size, sixteen_bit(levels).astype(">u2").tobytes()), Image.fromarray(levels, "L")
    if mode == "I":
        return Image.fromarray(sixteen_bit(levels).astype(np.int32), "I"), Image.fromarray(levels, "L")
    if mode == "F":
        return Image.fromarray((levels / 255.0).astype(np.float32), "F"), Image.fromarray(levels, "L")
    picture = colour8()
    if mode in ("RGBa", "RGBA", "LA", "PA"):
        opaque = picture.convert(mode.upper() if mode != "RGBa" else "RGBA")
        return (opaque.convert("RGBa") if mode == "RGBa" else opaque), opaque
    converted = picture.convert(mode)
    return converted, converted


@pytest.mark.parametrize("mode", sorted(ACCEPTED_MODES))
def test_every_accepted_mode_renders_like_its_8_bit_picture(mode: str) -> None:
    image, picture = rendered(mode)
    assert image.mode == mode
    assert_close(to_rgb(image), picture, tolerance=1)


def test_out_of_range_wide_samples_are_clipped_not_wrapped() -> None:
    values = np.array([[-5, 0, 65535, 70000]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(values, "I")))[0, :, 0].tolist() == [0, 0, 255, 255]
    floats = np.array([[np.nan, -1.0, 0.5, 2.0]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(floats, "F")))[0, :, 0].tolist() == [0, 0, 128, 255]


def test_modes_not_served_are_refused_by_name() -> None:
    with pytest.raises(InvalidInputError, match="pixel mode 'HSV'"):
        to_rgb(Image.new("HSV", (4, 4)))
