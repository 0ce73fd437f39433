"""The one rule for names of fine-tuned models (and so of their folders in the store).

A name is 1 to 63 characters from ``[a-z0-9._-]``, starting with a letter or a digit:
``[a-z0-9][a-z0-9._-]{0,62}``. It doubles as a folder name in a shared store and as a
gRPC health service name, so names with a meaning of their own are refused: the health
services ``""`` (the whole server) and ``liveness``, and the names of built-in models.
"""

from __future__ import annotations

import re

from service.errors import InvalidInputError, quote

MODEL_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,62}"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)

LIVENESS_SERVICE = "liveness"  # health service SERVING for as long as the process runs
SERVER_SERVICE = ""  # health service of the whole server (readiness)
RESERVED_NAMES = frozenset({SERVER_SERVICE, LIVENESS_SERVICE})


def is_model_name(name: str) -> bool:
    """True if ``name`` follows the pattern and is not reserved (built-in names are not checked)."""
    return _MODEL_NAME.fullmatch(name) is not None and name not in RESERVED_NAMES


def validate_model_name(name: str, field_name: str = "output_model") -> str:
    """``name``, or INVALID_ARGUMENT saying what a valid name looks like."""
    if name in RESERVED_NAMES:
        raise InvalidInputError(
            f"{field_name} {quote(name)} is reserved (a health service name of the server); choose another name"
        )
    if _MODEL_NAME.fullmatch(name) is None:
        raise InvalidInputError(
            f"{field_name} {quote(name)} is not a valid model name: use 1 to 63 characters from lowercase letters, "
            f"digits, '_', '-' and '.', starting with a letter or digit (pattern {MODEL_NAME_PATTERN})"
        )
    return name
