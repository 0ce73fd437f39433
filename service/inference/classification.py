"""Top-k classes of logits, for the classification extension."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInputError


@dataclass(frozen=True)
class ClassScore:
    score: float  # the raw output value, as Triton reports it
    index: int
    label: str


def top_k(logits: np.ndarray, k: int, labels: list[str]) -> list[list[ClassScore]]:
    """The ``k`` highest outputs of each row of ``logits`` [N, C], best first."""
    if k < 1:
        raise InvalidInputError(f"classification count must be a positive integer, got {k}")
    k = min(k, logits.shape[1])
    # argsort of the negated row keeps ties in index order (stable). NaN (a head that diverged)
    # ranks last: argsort puts NaN at the end, and negating keeps it NaN.
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [
        [ClassScore(float(row[i]), int(i), labels[i] if i < len(labels) else str(i)) for i in indices]
        for row, indices in zip(logits, order, strict=True)
    ]
