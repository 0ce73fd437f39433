"""Training curves of a fine-tuning job as an image, for ``vision-client fine-tune --plot``.

matplotlib is an optional dependency (``pip install 'vision-client[plot]'``): it is
imported only here, only when a plot is asked for, and through its object API (no
pyplot, no global backend state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vision_client._types import JobEvent

# matplotlib itself, with the [plot] extra's bound: works from PyPI and from a checkout alike
# (the extra by name would make pip look for vision-client on PyPI from a checkout).
INSTALL_HINT = "pip install 'matplotlib>=3.8'"


class PlotUnavailableError(ImportError):
    """matplotlib is not installed."""


def check_available() -> None:
    """Raise :class:`PlotUnavailableError` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise PlotUnavailableError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from error


def plot_training(
    epochs: Sequence[JobEvent], path: str | Path, *, title: str, validation: bool, accuracy: bool
) -> Path:
    """Save the train and validation loss per epoch (and the validation accuracy) to ``path``.

    ``validation``: the job had a validation split (else only the train loss is drawn);
    ``accuracy``: its head is a classifier (cross_entropy), so accuracy means something.
    The image format follows the file's extension (png, svg, pdf, ...).
    """
    check_available()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    numbers = [event.epoch for event in epochs]
    with_accuracy = validation and accuracy
    figure = Figure(figsize=(11 if with_accuracy else 6.5, 4.2), layout="constrained")
    axes = figure.subplots(1, 2 if with_accuracy else 1, squeeze=False)[0]
    losses = axes[0]
    losses.plot(numbers, [event.train_loss for event in epochs], marker=".", label="train loss")
    if validation:
        losses.plot(numbers, [event.validation_loss for event in epochs], marker=".", label="validation loss")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    losses.set_xlabel("epoch")
    losses.set_ylabel("loss")
    losses.set_title("loss")
    losses.grid(alpha=0.3)
    losses.legend()
    if with_accuracy:
        right = axes[1]
        right.plot(numbers, [event.validation_accuracy for event in epochs], marker=".", color="tab:green")
        right.set_xlabel("epoch")
        right.set_ylabel("validation accuracy")
        right.set_ylim(0.0, 1.02)
        right.set_title("validation accuracy")
        right.grid(alpha=0.3)
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
