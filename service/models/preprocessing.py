"""A model's torchvision preprocessing as data (:class:`service.inference.preprocess.Preprocessing`), read
from its weights' transform here, where torch is imported, so that the decoder needs none."""

from __future__ import annotations

from typing import Any

from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from service.inference.preprocess import PIL_RESAMPLING, Preprocessing


def preprocessing_of(transform: Any) -> Preprocessing:
    """The :class:`Preprocessing` that ``transform`` (torchvision's ``ImageClassification``, what
    ``weights.transforms()`` returns for classifiers) applies to a PIL image.

    ValueError for any other transform, or one whose sizes are not a single side each (the preset
    resizes the shorter side and crops a square): its effect could not be reproduced exactly.
    """
    if not isinstance(transform, ImageClassification):
        raise ValueError(
            f"preprocessing: {type(transform).__name__} is not torchvision's ImageClassification preset; "
            "only that preset is reproduced without torch"
        )
    resize, crop = list(transform.resize_size), list(transform.crop_size)
    if len(resize) != 1 or len(crop) != 1:
        raise ValueError(f"preprocessing: expected one resize side and one crop side, got {resize} and {crop}")
    interpolation = transform.interpolation
    mode = interpolation.value if isinstance(interpolation, InterpolationMode) else str(interpolation)
    if mode not in PIL_RESAMPLING:
        raise ValueError(f"preprocessing: interpolation {mode!r} has no Pillow equivalent")
    mean, std = tuple(float(v) for v in transform.mean), tuple(float(v) for v in transform.std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"preprocessing: expected a mean and a std per RGB channel, got {mean} and {std}")
    # Pillow always antialiases (torchvision ignores antialias=False for PIL images, with a warning).
    return Preprocessing(
        resize_size=int(resize[0]),
        crop_size=int(crop[0]),
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        interpolation=mode,
    )
