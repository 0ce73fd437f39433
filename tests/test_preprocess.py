"""Decoding: every format we promise, and every way bytes can be bad."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.models import AlexNet_Weights

from service.errors import InvalidInputError
from service.preprocess import ImageDecoder
from tests.conftest import encode

TRANSFORM = AlexNet_Weights.DEFAULT.transforms()


@pytest.fixture()
def decoder() -> ImageDecoder:
    return ImageDecoder(TRANSFORM, max_pixels=4_000_000)


def photo(size=(320, 240)) -> Image.Image:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste((200, 30, 90), (20, 20, 120, 100))
    return image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_formats_decode_like_the_torchvision_reference(decoder: ImageDecoder, fmt: str) -> None:
    data = encode(photo(), fmt)
    expected = TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(decoder(data), expected)


def test_gif_uses_the_first_frame(decoder: ImageDecoder) -> None:
    first, second = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second])
    decoded = decoder.decode(buffer.getvalue())
    assert decoded.getpixel((5, 5))[0] > 200


def test_one_pixel_image_is_served(decoder: ImageDecoder) -> None:
    assert decoder(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")).shape == (3, 224, 224)


def test_grayscale_and_transparent_images_become_rgb(decoder: ImageDecoder) -> None:
    assert decoder(encode(Image.new("L", (50, 50), 128), "PNG")).shape[0] == 3
    assert decoder(encode(Image.new("RGBA", (50, 50), (1, 2, 3, 0)), "PNG")).shape[0] == 3


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a decodable image"),
        (encode(photo(), "JPEG")[:300], "truncated or corrupt"),
        (encode(photo(), "PNG")[:100], "truncated or corrupt"),
    ],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_are_invalid_input(decoder: ImageDecoder, data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decoder(data)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    decoder = ImageDecoder(TRANSFORM, max_pixels=10_000)
    with pytest.raises(InvalidInputError, match="over the limit"):
        decoder(encode(Image.new("RGB", (200, 200)), "PNG"))


def test_formats_we_do_not_promise_are_refused(decoder: ImageDecoder) -> None:
    with pytest.raises(InvalidInputError, match="TIFF"):
        decoder(encode(photo(), "TIFF"))
