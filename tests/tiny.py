"""The tiny model of the fast test tier (``service.models.tiny``: the real serving path on a
network of a few thousand parameters), under the names the tests use."""

from __future__ import annotations

from service.models.tiny import TINY, TINY_FEATURE_DIM, TinyNet, tiny

__all__ = ["TINY", "TINY_FEATURE_DIM", "TinyNet", "tiny"]
