"""Decoding: every format we promise, every way bytes can be bad, and preprocessing without torch
that equals torchvision's ``weights.transforms()`` bit for bit, for every served model's preset."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.models import AlexNet_Weights
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from service.errors import InternalError, InvalidInputError
from service.inference.preprocess import ImageDecoder, Preprocessing
from service.models import get_model_spec, list_models
from service.models.preprocessing import preprocessing_of
from tests.conftest import encode

TRANSFORM = AlexNet_Weights.DEFAULT.transforms()
MAX_PIXELS = 40_000_000  # the server's default --max-image-pixels


@pytest.fixture()
def decoder() -> ImageDecoder:
    return ImageDecoder(preprocessing_of(TRANSFORM), max_pixels=4_000_000)


def photo(size=(320, 240)) -> Image.Image:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste((200, 30, 90), (20, 20, 120, 100))
    return image


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_formats_decode_like_the_torchvision_reference(decoder: ImageDecoder, fmt: str) -> None:
    data = encode(photo(), fmt)
    expected = TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(as_tensor(decoder(data)), expected)


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


BAD_BYTES = [
    (b"", "empty"),
    (b"definitely not an image", "not a decodable image"),
    (encode(photo(), "JPEG")[:300], "truncated or corrupt"),
    (encode(photo(), "PNG")[:100], "truncated or corrupt"),
]
BAD_IDS = ["empty", "garbage", "truncated-jpeg", "truncated-png"]


@pytest.mark.parametrize("data, message", BAD_BYTES, ids=BAD_IDS)
def test_bad_bytes_are_invalid_input(decoder: ImageDecoder, data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decoder(data)


@pytest.mark.parametrize("data, message", BAD_BYTES, ids=BAD_IDS)
def test_check_refuses_what_decoding_refuses(decoder: ImageDecoder, data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decoder.check(data, 3)


def test_check_decodes_jpeg_at_reduced_size(decoder: ImageDecoder) -> None:
    data = encode(photo((1600, 1200)), "JPEG")
    decoder.check(data)  # accepted
    assert decoder.decode(data, reduce_to=64).size == (200, 150)  # JPEG draft: 1/8 scale, not under 64
    assert decoder.decode(data).size == (1600, 1200)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    decoder = ImageDecoder(preprocessing_of(TRANSFORM), max_pixels=10_000)
    with pytest.raises(InvalidInputError, match="over the limit"):
        decoder(encode(Image.new("RGB", (200, 200)), "PNG"))


def test_formats_we_do_not_promise_are_refused(decoder: ImageDecoder) -> None:
    with pytest.raises(InvalidInputError, match="TIFF"):
        decoder(encode(photo(), "TIFF"))


# -- exact preprocessing -------------------------------------------------------------------------

# Every served model's preset, and presets that reach the other branches of torchvision's code:
# a crop larger than the resize (zero padding), odd sides, other interpolations.
PRESETS = {
    **{name: get_model_spec(name).transforms() for name in list_models()},
    "padded": ImageClassification(crop_size=224, resize_size=200),
    "odd": ImageClassification(crop_size=223, resize_size=241, mean=(0.5, 0.25, 0.125), std=(0.3, 0.2, 0.1)),
    "bicubic": ImageClassification(crop_size=224, resize_size=256, interpolation=InterpolationMode.BICUBIC),
    "nearest": ImageClassification(crop_size=64, resize_size=80, interpolation=InterpolationMode.NEAREST),
    "lanczos": ImageClassification(crop_size=96, resize_size=128, interpolation=InterpolationMode.LANCZOS),
}

# (width, height): smaller and larger than the crop, odd, exactly the resize and the crop, margins
# around the crop that torchvision's rounding places, and extreme aspect ratios (1xN, Nx1; the
# resize makes their longer side up to 256 times longer).
SIZES = [
    (1, 1),
    (2, 3),
    (31, 17),
    (200, 150),
    (223, 224),
    (224, 224),
    (232, 232),
    (256, 256),
    (257, 255),
    (259, 256),  # margins of 3 and 11 pixels around the crop: round() halves to even, not down
    (232, 243),
    (320, 240),
    (333, 777),
    (1023, 769),
    (1, 97),
    (97, 1),
    (1, 301),
    (450, 2),
]


def texture(width: int, height: int, seed: int) -> np.ndarray:
    """[height, width, 3] uint8: a gradient with noise, so every resampling weight shows."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.linspace(0, 180, height), np.linspace(0, 60, width))[:, :, None]
    return np.clip(ramp + rng.integers(0, 76, (height, width, 3)), 0, 255).astype(np.uint8)


def reference(transform: ImageClassification, rgb: Image.Image) -> torch.Tensor:
    torch.set_num_threads(1)
    with torch.inference_mode():
        result: torch.Tensor = transform(rgb)
    return result


def assert_equal_to_torchvision(decoder: ImageDecoder, transform: ImageClassification, data: bytes) -> None:
    expected = reference(transform, Image.open(io.BytesIO(data)).convert("RGB"))
    got = as_tensor(decoder(data))
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"max abs difference {float((got - expected).abs().max())}"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preprocessing_equals_torchvision_on_every_size(preset: str) -> None:
    transform = PRESETS[preset]
    decoder = ImageDecoder(preprocessing_of(transform), max_pixels=MAX_PIXELS)
    for seed, (width, height) in enumerate(SIZES):
        assert_equal_to_torchvision(decoder, transform, encode(Image.fromarray(texture(width, height, seed)), "PNG"))


def modes(width: int, height: int) -> dict[str, bytes]:
    """One image, encoded in every pixel mode and format we serve."""
    rgb = Image.fromarray(texture(width, height, width * 7 + height))
    alpha = Image.fromarray(texture(width, height, 3)[:, :, 0])
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    grey_with_alpha = rgb.convert("L")
    grey_with_alpha.putalpha(alpha)
    return {
        "rgb-jpeg": encode(rgb, "JPEG", quality=90),
        "rgb-webp": encode(rgb, "WEBP", lossless=True),
        "rgb-bmp": encode(rgb, "BMP"),
        "grey-png": encode(rgb.convert("L"), "PNG"),
        "grey-jpeg": encode(rgb.convert("L"), "JPEG"),
        "bilevel-png": encode(rgb.convert("1"), "PNG"),
        "grey-alpha-png": encode(grey_with_alpha, "PNG"),
        "rgba-png": encode(rgba, "PNG"),
        "palette-png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette-gif": encode(rgb, "GIF"),
        "cmyk-jpeg": encode(rgb.convert("CMYK"), "JPEG"),
    }


@pytest.mark.parametrize("model", list_models())
@pytest.mark.parametrize("size", [(320, 240), (97, 301), (1, 150), (700, 3)], ids=lambda size: "x".join(map(str, size)))
def test_preprocessing_equals_torchvision_in_every_mode(model: str, size: tuple[int, int]) -> None:
    transform = get_model_spec(model).transforms()
    decoder = ImageDecoder(preprocessing_of(transform), max_pixels=MAX_PIXELS)
    for kind, data in modes(*size).items():
        assert Image.open(io.BytesIO(data)).mode != "RGB" or "rgb" in kind  # what each case is meant to be
        try:
            assert_equal_to_torchvision(decoder, transform, data)
        except AssertionError as exc:
            raise AssertionError(f"{kind}: {exc}") from exc


@pytest.mark.parametrize("model", list_models())
def test_sixteen_bit_png_equals_torchvision_on_its_8_bit_rendering(model: str) -> None:
    """Wide samples are scaled to 8 bits (not clipped, as Pillow's convert would); from there on,
    torchvision's preprocessing exactly."""
    transform = get_model_spec(model).transforms()
    decoder = ImageDecoder(preprocessing_of(transform), max_pixels=MAX_PIXELS)
    wide = (np.add.outer(np.arange(300), np.arange(200)) * 97 % 65536).astype(np.uint16)
    data = encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rendering = Image.fromarray(((wide.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    assert torch.equal(as_tensor(decoder(data)), reference(transform, rendering))


def test_preprocessing_equals_torchvision_on_photographs(photos: dict[str, bytes]) -> None:
    for model in list_models():
        transform = get_model_spec(model).transforms()
        decoder = ImageDecoder(preprocessing_of(transform), max_pixels=MAX_PIXELS)
        for data in photos.values():
            assert_equal_to_torchvision(decoder, transform, data)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_8_bit_value_normalises_as_torchvision_does(preset: str) -> None:
    transform = PRESETS[preset]
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 1, 256)
    expected = F.normalize(F.convert_image_dtype(levels, torch.float), mean=transform.mean, std=transform.std)
    assert torch.equal(torch.from_numpy(preprocessing_of(transform).lookup_table()), expected.view(3, 256))


# -- writing into a batch ---------------------------------------------------------------------


def test_decodes_straight_into_a_row_of_a_batch(decoder: ImageDecoder) -> None:
    batch = np.full((3, 3, 224, 224), 7.0, dtype=np.float32)
    data = encode(photo(), "PNG")
    written = decoder(data, 1, batch[1])
    assert np.shares_memory(written, batch)
    assert torch.equal(torch.from_numpy(batch[1]), TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB")))
    assert (batch[0] == 7.0).all() and (batch[2] == 7.0).all()


@pytest.mark.parametrize(
    "out",
    [
        np.empty((3, 224, 223), dtype=np.float32),
        np.empty((3, 224, 224), dtype=np.float64),
        np.empty((224, 224, 3), dtype=np.float32),
    ],
    ids=["shape", "dtype", "layout"],
)
def test_a_row_of_another_kind_is_an_internal_error(decoder: ImageDecoder, out: np.ndarray) -> None:
    with pytest.raises(InternalError, match=r"float32 array of shape \(3, 224, 224\)"):
        decoder(encode(photo(), "PNG"), 0, out)


def test_a_read_only_row_is_an_internal_error(decoder: ImageDecoder) -> None:
    out = np.empty((3, 224, 224), dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises(InternalError, match="read-only"):
        decoder(encode(photo(), "PNG"), 0, out)


# -- images whose preprocessing would be huge --------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1000), (5000, 1)], ids=["1x1000", "5000x1"])
def test_an_extreme_aspect_ratio_is_refused_before_decoding(size: tuple[int, int]) -> None:
    """A 1x1000 image is 1,000 pixels, but resizing its shorter side to 256 makes it 256x256,000:
    refused from its header, by serving and by fine-tuning's check alike, with the way out."""
    decoder = ImageDecoder(preprocessing_of(TRANSFORM), max_pixels=MAX_PIXELS)
    data = encode(Image.new("RGB", size), "PNG")
    for attempt in (lambda: decoder(data, 2), lambda: decoder.check(data, 2)):
        with pytest.raises(InvalidInputError, match=r"IMAGE element 2 is .* over the limit .* nearer to square"):
            attempt()


def test_the_longest_served_aspect_ratio_is_served() -> None:
    preprocessing = preprocessing_of(TRANSFORM)
    longest = MAX_PIXELS // (256 * 256)  # a 1xN image becomes 256 x 256N
    assert math.prod(preprocessing.resized_size(1, longest)) <= MAX_PIXELS
    assert math.prod(preprocessing.resized_size(1, longest + 1)) > MAX_PIXELS
    decoder = ImageDecoder(preprocessing, max_pixels=MAX_PIXELS)
    assert decoder(encode(Image.new("L", (longest, 1), 99), "PNG")).shape == (3, 224, 224)


# -- the description as data --------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preprocessing_survives_json(preset: str) -> None:
    preprocessing = preprocessing_of(PRESETS[preset])
    assert Preprocessing.from_dict(json.loads(json.dumps(preprocessing.to_dict()))) == preprocessing


def test_every_served_model_has_the_imagenet_preset_it_should() -> None:
    expected = {"alexnet": (256, 224), "vgg16": (256, 224), "resnet101": (232, 224), "tiny": (256, 224)}
    for model in list_models():
        preprocessing = preprocessing_of(get_model_spec(model).transforms())
        assert (preprocessing.resize_size, preprocessing.crop_size) == expected[model]
        assert preprocessing.interpolation == "bilinear"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"crop_size": None}, "missing fields"),
        ({"extra": 1}, "unknown fields"),
        ({"crop_size": 0}, "crop_size must be a positive integer"),
        ({"resize_size": 25.5}, "resize_size must be a positive integer"),
        ({"mean": [0.5, 0.5]}, "mean must be three finite numbers"),
        ({"std": [0.2, float("nan"), 0.2]}, "std must be three finite numbers"),
        ({"std": [0.2, 0.0, 0.2]}, "std must not be zero"),
        ({"interpolation": "sinc"}, "interpolation must be one of"),
    ],
)
def test_a_wrong_description_is_refused_by_name(change: dict[str, object], message: str) -> None:
    data = {**preprocessing_of(TRANSFORM).to_dict(), **change}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        Preprocessing.from_dict(data)


def test_only_the_classification_preset_is_reproduced() -> None:
    with pytest.raises(ValueError, match="not torchvision's ImageClassification"):
        preprocessing_of(lambda image: image)
