"""Decoding encoded images and applying a model's exact preprocessing, with Pillow and numpy
only: protocol processes that never import torch decode ``IMAGE`` inputs with it.

:class:`Preprocessing` describes torchvision's ``ImageClassification`` preset (the
``weights.transforms()`` of every served model) as plain data that can be sent between
processes; :class:`ImageDecoder` applies it bit for bit as torchvision does, writing into a
float32 array it is given. Runs in a thread pool (Pillow and numpy release the GIL while they work).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InternalError, InvalidInputError, quote

# The formats we promise; others Pillow might read are refused so that the
# decoder surface stays small (no EPS/PDF/plugin formats from strangers).
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF"})


# How each Pillow mode the formats above can produce maps to 8-bit RGB. Wide samples are
# scaled, not clipped: Pillow's own conversion clips them, so 50 % grey in a 16-bit PNG
# would come out white.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # 0..65535 ("I": a 16-bit PNG)
FLOAT_MODES = frozenset({"F"})  # 0.0..1.0
PALETTE_OR_ALPHA_MODES = frozenset({"P", "PA", "LA", "RGBA", "RGBa"})  # colours as stored, alpha dropped
EIGHT_BIT_MODES = frozenset({"1", "L", "RGB", "RGBX", "CMYK", "YCbCr"})
ACCEPTED_MODES = SIXTEEN_BIT_MODES | FLOAT_MODES | PALETTE_OR_ALPHA_MODES | EIGHT_BIT_MODES


def to_rgb(image: Image.Image, where: str = "the image", *, keep_grey: bool = False) -> Image.Image:
    """``image`` as 8-bit RGB, the way its 8-bit rendering would look.

    Alpha is dropped (colours kept as stored), as ``Image.convert("RGB")`` and so
    torchvision's own image loader do for 8-bit images. ``keep_grey``: a greyscale image
    stays one 8-bit band ("L"), the value all three RGB channels would hold (Pillow resizes
    each band alike, so preprocessing it is a third of the work for the same result).
    """
    mode = image.mode
    if mode == "RGB" or (keep_grey and mode == "L" and "transparency" not in image.info):
        image.load()  # decode here, where decoding errors are caught, not in the transform
        return image
    if mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif mode in FLOAT_MODES:
        unit = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0), 0.0, 1.0)
        image = Image.fromarray(np.rint(unit * 255.0).astype(np.uint8), "L")
    elif mode in PALETTE_OR_ALPHA_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode not in EIGHT_BIT_MODES:
        raise InvalidInputError(
            f"{where} has pixel mode {quote(mode)}, which is not served; send 8- or 16-bit greyscale, "
            "palette, RGB, RGBA or CMYK images"
        )
    if keep_grey and image.mode in ("1", "L"):
        return image if image.mode == "L" else image.convert("L")
    return image.convert("RGB")


# torchvision's interpolation modes (``InterpolationMode.value``) as Pillow applies them to a PIL
# image (torchvision.transforms.functional.pil_modes_mapping); Pillow always antialiases.
PIL_RESAMPLING: Mapping[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """torchvision's ``ImageClassification`` preset as data: the shorter side resized to
    ``resize_size`` (Pillow, antialiased), a centred ``crop_size`` square (zero-padded where the
    image is smaller), values in [0, 1] normalised by ``mean`` and ``std`` per channel.

    Built from a model's transform by :func:`service.models.preprocessing.preprocessing_of`;
    :meth:`to_dict` and :meth:`from_dict` carry it between processes as plain data.
    """

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        problems = []
        for name in ("resize_size", "crop_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, not {value!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            ):
                problems.append(f"{name} must be three finite numbers (one per channel), not {value!r}")
        if not problems and not all(np.float32(v) != 0 for v in self.std):
            problems.append(f"std must not be zero (in float32), got {self.std!r}")
        if self.interpolation not in PIL_RESAMPLING:
            problems.append(f"interpolation must be one of {', '.join(PIL_RESAMPLING)}, not {self.interpolation!r}")
        if problems:
            raise ValueError("preprocessing: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, lists, a string), for JSON or a pickle-free channel."""
        return {
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; ValueError naming what is missing, unknown or wrong."""
        fields = {"resize_size", "crop_size", "mean", "std", "interpolation"}
        missing = sorted(fields - {"interpolation"} - set(data))
        unknown = sorted(set(data) - fields)
        if missing or unknown:
            raise ValueError(f"preprocessing: missing fields {missing}, unknown fields {unknown}")
        mean, std = data["mean"], data["std"]
        return cls(
            resize_size=data["resize_size"],
            crop_size=data["crop_size"],
            mean=tuple(mean) if isinstance(mean, (list, tuple)) else mean,
            std=tuple(std) if isinstance(std, (list, tuple)) else std,
            interpolation=data.get("interpolation", "bilinear"),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize of the shorter side, computed as torchvision does
        (``_compute_resized_output_size``: the longer side truncated, in Python floats)."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The centred crop of a (width, height) image as a Pillow box (left, top, right, bottom),
        as torchvision's ``center_crop`` places it: zero padding first where the image is
        smaller (left/top get the smaller half), then ``round`` (half to even) of the margin."""
        size = self.crop_size
        pad_left = (size - width) // 2 if size > width else 0
        pad_top = (size - height) // 2 if size > height else 0
        padded_width = max(width, size)
        padded_height = max(height, size)
        left = round((padded_width - size) / 2.0) - pad_left
        top = round((padded_height - size) / 2.0) - pad_top
        return (left, top, left + size, top + size)

    def lookup_table(self) -> np.ndarray:
        """[3, 256] float32: every 8-bit value of each channel after ``/ 255``, ``- mean`` and
        ``/ std``, each step rounded to float32 as torchvision's ``convert_image_dtype`` and
        ``normalize`` round it."""
        values = np.arange(256, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1)
        table: np.ndarray = ((values[np.newaxis, :] - mean) / std).astype(np.float32)
        return table


class ImageDecoder:
    """Turns one encoded image into the model's input (3xSxS float32, S the crop size), exactly as
    torchvision's ``weights.transforms()`` would from the image's RGB rendering."""

    def __init__(self, preprocessing: Preprocessing, *, max_pixels: int) -> None:
        self.preprocessing = preprocessing
        self._max_pixels = max_pixels
        self._resample = PIL_RESAMPLING[preprocessing.interpolation]
        self._table = preprocessing.lookup_table()
        self._table.flags.writeable = False
        # Pillow's own guard (MAX_IMAGE_PIXELS, a process-wide setting; its warning is an error
        # below) must not be stricter than --max-image-pixels, or an image within our limit would
        # be refused by a limit no option names. It is only ever raised; ours is checked after open.
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_pixels
        # Pillow imports its format plugins on the first image it opens; do it now, at start-up,
        # rather than while the event loop waits on the first request's decode job's import lock.
        Image.init()

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one preprocessed image: (3, S, S)."""
        side = self.preprocessing.crop_size
        return (3, side, side)

    def __call__(self, data: bytes, index: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """Decode and preprocess ``data`` into ``out`` (a writable float32 array of :attr:`shape`,
        a row of a batch), or into a new array; returns the array written."""
        image = self._decode(data, index, keep_grey=True)
        try:
            return self.preprocess(image, out)
        finally:
            image.close()

    def preprocess(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """The preset applied to the RGB image ``image``: equal, bit for bit, to torchvision's
        ``transforms(image)``, written into ``out`` (or a new array) without an intermediate."""
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        elif out.shape != self.shape or out.dtype != np.float32 or not out.flags.writeable:
            raise InternalError(
                f"preprocessing writes a float32 array of shape {self.shape}, was given a "
                f"{'' if out.flags.writeable else 'read-only '}{out.dtype} array of shape {tuple(out.shape)}"
            )
        width, height = image.size
        size = self.preprocessing.resized_size(width, height)
        if size != (width, height):
            image = image.resize(size, self._resample)
        cropped = image.crop(self.preprocessing.crop_box(*size))  # outside the image: zeros, as torchvision pads
        pixels = np.asarray(cropped)
        if pixels.ndim == 2:  # a single band (greyscale, resized as one): the same values in every channel
            for channel in range(3):
                np.take(self._table[channel], pixels, out=out[channel], mode="clip")
        else:
            for channel in range(3):
                np.take(self._table[channel], pixels[:, :, channel], out=out[channel], mode="clip")
        return out

    def check(self, data: bytes, index: int = 0, size: int = 64) -> None:
        """Refuse ``data`` exactly as :meth:`decode` would, decoding JPEG at reduced size
        (at least ``size`` on each side): what is checked only costs a fraction of a decode."""
        self.decode(data, index, reduce_to=size).close()

    def decode(self, data: bytes, index: int = 0, *, reduce_to: int | None = None) -> Image.Image:
        """Decode to an RGB PIL image, refusing what is not an image we accept.

        ``reduce_to``: let JPEG decode at a reduced scale, no smaller than that on each side.
        """
        return self._decode(data, index, reduce_to=reduce_to)

    def _decode(self, data: bytes, index: int, *, reduce_to: int | None = None, keep_grey: bool = False) -> Image.Image:
        where = f"IMAGE element {index}"
        if not data:
            raise InvalidInputError(f"{where} is empty: send the bytes of an encoded JPEG, PNG, WebP, BMP or GIF")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                if image.format not in ACCEPTED_FORMATS:
                    raise InvalidInputError(
                        f"{where} is a {image.format} image; accepted formats are JPEG, PNG, WebP, BMP and GIF"
                    )
                width, height = image.size
                if width * height > self._max_pixels:
                    raise InvalidInputError(
                        f"{where} is {width}x{height} = {width * height} pixels, over the limit of "
                        f"{self._max_pixels} (--max-image-pixels); downscale it before sending"
                    )
                resized_width, resized_height = self.preprocessing.resized_size(width, height)
                if resized_width * resized_height > self._max_pixels:
                    raise InvalidInputError(
                        f"{where} is {width}x{height}: the model's preprocessing resizes its shorter side to "
                        f"{self.preprocessing.resize_size} pixels, which would make it "
                        f"{resized_width}x{resized_height} = {resized_width * resized_height} pixels, over the "
                        f"limit of {self._max_pixels} "
                        "(--max-image-pixels); crop it nearer to square before sending"
                    )
                if reduce_to is not None and image.format in ("JPEG", "MPO"):
                    image.draft("RGB", (reduce_to, reduce_to))
                # Animated GIF/WebP and MPO open at their first frame, the one we serve
                # (counting frames would read the whole file).
                return to_rgb(image, where, keep_grey=keep_grey)
        except InvalidInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidInputError(
                f"{where} declares more pixels than allowed, over the limit of {self._max_pixels} (--max-image-pixels; "
                f"decompression bomb guard: {pil_reason(exc)}); downscale it before sending"
            ) from exc
        except UnidentifiedImageError as exc:
            raise InvalidInputError(
                f"{where} ({len(data)} bytes) is not a decodable image: {pil_reason(exc)}. "
                "Send the raw bytes of a JPEG, PNG, WebP, BMP or GIF file"
            ) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidInputError(
                f"{where} ({len(data)} bytes) is truncated or corrupt: {pil_reason(exc)}. Send the complete file"
            ) from exc


_PYTHON_REPR = re.compile(r"<[^<>]{0,200}? at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def pil_reason(exc: BaseException) -> str:
    """Pillow's message for a decoding error, as a client may read it: Python's reprs of the objects
    Pillow read from (``<_io.BytesIO object at 0x7f...>``, a heap address) become "the image", any
    other address is dropped, and the text is cut short. The one place Pillow's words become ours."""
    text = _PYTHON_REPR.sub("the image", str(exc))
    text = _ADDRESS.sub("(address)", text).strip()
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


async def decode_rows(
    decoder: ImageDecoder,
    images: Sequence[bytes],
    output: np.ndarray,
    pool: concurrent.futures.Executor,
    window: int,
) -> None:
    """Decode ``images`` into the rows of ``output`` ([N, 3, S, S]) in ``pool``, at most ``window``
    at a time, so that one large request cannot hold every other request's images behind all of its
    own; each job decodes one image straight into its row. The first image that fails ends it:
    decodes not yet started never start, and those running are waited for, since they write into
    ``output``, which the caller may hand to another request next."""
    loop = asyncio.get_running_loop()
    started: list[concurrent.futures.Future[np.ndarray]] = []
    running: set[asyncio.Future[np.ndarray]] = set()
    submitted = 0
    try:
        while submitted < len(images) or running:
            while submitted < len(images) and len(running) < window:
                job = pool.submit(decoder, images[submitted], submitted, output[submitted])
                started.append(job)
                running.add(asyncio.wrap_future(job))
                submitted += 1
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                future.result()
    except BaseException:
        for job in started:
            job.cancel()
        busy = [job for job in started if not job.done()]
        if busy:
            await asyncio.shield(loop.run_in_executor(None, concurrent.futures.wait, busy))
        raise
