"""How far a model computing in a reduced precision (``--dtype``) is from float32, measured at load.

A model is run once in float32 (the torch network as built: torchvision's reference) and once on
its reduced-precision backend, on the same fixed images: the two photographs scikit-learn ships
(``sklearn/datasets/images``, CC BY 2.0), six views of each (whole, the four halves, the centre),
each through the model's own preprocessing. The files are found without importing scikit-learn and
read with the server's bounded reader. Where scikit-learn is not installed (it is not a server
dependency) the images are twelve seeded Pillow drawings instead, and :attr:`Agreement.images_source`
says so: the figures of the two sets are not comparable.

Reported per image pair of logits: the cosine (lowest and mean over the images), whether the top-1
class is the same (the fraction that agree) and the largest relative error (``max|a-b| / max|a|``
per image, the worst). ``--min-precision-agreement`` is a floor on the lowest cosine: under it
:func:`check_floor` refuses the model in that precision.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from service.config import FLOAT32
from service.errors import FailedPreconditionError
from service.host.files import read_bounded
from service.models import ModelSpec
from service.runtimes.base import LOGITS, Backend

log = logging.getLogger(__name__)

SAMPLE_FILES = ("china.jpg", "flower.jpg")  # scikit-learn's load_sample_images
MAX_SAMPLE_BYTES = 4 * 1024 * 1024
SKLEARN_SOURCE = "scikit-learn sample images (china.jpg, flower.jpg), 6 views each"
SYNTHETIC_SOURCE = "12 seeded Pillow drawings (scikit-learn is not installed)"
SYNTHETIC_SEED = 20_240_611


@dataclass(frozen=True)
class Agreement:
    """A reduced precision's logits against float32's on the sample images."""

    images: int
    images_source: str
    min_cosine: float
    mean_cosine: float
    top1: float  # fraction of images whose top-1 class is float32's
    max_relative_error: float

    def describe(self) -> str:
        return (
            f"cosine min {self.min_cosine:.5f} mean {self.mean_cosine:.5f}, top-1 agreement "
            f"{self.top1:.3f}, max relative error {self.max_relative_error:.2e} on {self.images} images"
        )


@dataclass(frozen=True)
class Precision:
    """What a served model computes in, and (in a reduced precision) its agreement with float32."""

    dtype: str = FLOAT32
    agreement: Agreement | None = None  # None in float32 (exact), and for a fine-tuned head


def sample_images() -> tuple[list[Image.Image], str]:
    """The fixed images agreement is measured on, and where they come from."""
    return _sample_images()


@functools.cache
def _sample_images() -> tuple[list[Image.Image], str]:
    found = importlib.util.find_spec("sklearn")
    if found is not None and found.origin is not None:
        folder = Path(found.origin).parent / "datasets" / "images"
        try:
            photos = [_open(folder / name) for name in SAMPLE_FILES]
        except (OSError, ValueError) as exc:
            log.warning("scikit-learn's sample images cannot be read (%s); measuring on drawings", exc)
        else:
            return [view for photo in photos for view in _views(photo)], SKLEARN_SOURCE
    return _drawings(12), SYNTHETIC_SOURCE


def _open(path: Path) -> Image.Image:
    with Image.open(io.BytesIO(read_bounded(path, MAX_SAMPLE_BYTES))) as image:
        rgb: Image.Image = image.convert("RGB")
        return rgb


def _views(photo: Image.Image) -> list[Image.Image]:
    """The whole photograph, its four halves and its centre."""
    w, h = photo.size
    boxes = [(0, 0, w, h), (0, 0, w // 2, h), (w // 2, 0, w, h), (0, 0, w, h // 2), (0, h // 2, w, h)]
    boxes.append((w // 4, h // 4, w - w // 4, h - h // 4))
    return [photo.crop(box) for box in boxes]


def _drawings(count: int) -> list[Image.Image]:
    rng = random.Random(SYNTHETIC_SEED)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (320, 256), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.randrange(300), rng.randrange(240)
            box = (x0, y0, x0 + rng.randrange(10, 160), y0 + rng.randrange(10, 120))
            colour = tuple(rng.randrange(256) for _ in range(3))
            [draw.ellipse, draw.rectangle][rng.randrange(2)](box, fill=colour)
        images.append(image)
    return images


def sample_batch(spec: ModelSpec) -> torch.Tensor:
    """The sample images through ``spec``'s preprocessing: float32 [n, 3, S, S]."""
    transform = spec.transforms()
    return torch.stack([transform(image) for image in sample_images()[0]])


def reference_logits(spec: ModelSpec, net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """float32 logits of ``net`` (as built: float32, on the CPU) for ``batch``."""
    with torch.inference_mode():
        logits: torch.Tensor = net(batch.to(torch.float32))
    return logits.float()


def measure(backend: Backend, batch: torch.Tensor, reference: torch.Tensor) -> Agreement:
    """``backend``'s logits for ``batch`` against ``reference`` (float32's)."""
    with torch.inference_mode():
        got = backend.run(backend.gather([batch]), LOGITS).float().cpu()
    ref = reference.double()
    out = got.double()
    cosines = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    errors = (out - ref).abs().amax(dim=1) / ref.abs().amax(dim=1).clamp_min(1e-12)
    return Agreement(
        images=int(batch.shape[0]),
        images_source=sample_images()[1],
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        top1=float((out.argmax(1) == ref.argmax(1)).double().mean()),
        max_relative_error=float(errors.max()),
    )


def worst(first: Agreement, second: Agreement) -> Agreement:
    """The lower figures of two measurements (of one model on two devices)."""
    return Agreement(
        images=first.images,
        images_source=first.images_source,
        min_cosine=min(first.min_cosine, second.min_cosine),
        mean_cosine=min(first.mean_cosine, second.mean_cosine),
        top1=min(first.top1, second.top1),
        max_relative_error=max(first.max_relative_error, second.max_relative_error),
    )


def check_floor(model: str, asked: str, agreement: Agreement, floor: float) -> None:
    """Refuse ``model`` in the precision ``--dtype`` asked as ``asked`` when its lowest cosine is under ``floor``."""
    if agreement.min_cosine < floor:
        raise FailedPreconditionError(
            f"{model} is not served in --dtype {asked}: its logits agree with float32's only to a lowest cosine of "
            f"{agreement.min_cosine:.5f}, under --min-precision-agreement {floor:g} ({agreement.describe()}); "
            f"serve it in float32 (--dtype {FLOAT32}, or leave {model} out of the reduced models) or lower the floor"
        )
