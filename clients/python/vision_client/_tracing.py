"""W3C Trace Context for every call, when the caller traces with OpenTelemetry.

If ``opentelemetry-api`` is importable (``pip install vision-client[tracing]``) and the caller
has an active span, each call carries the span's context in the headers the configured
propagators write (``traceparent`` and ``tracestate`` by default, W3C's): gRPC metadata or
HTTP headers, so the server continues the caller's trace on either port. Without the package,
or without a span, calls carry nothing more. The package is not a dependency of the SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

_propagate: Any = None
_looked = False


def _propagator() -> Any:
    """``opentelemetry.propagate``, imported once on first use; None when it is not installed."""
    global _propagate, _looked
    if not _looked:
        try:
            _propagate = importlib.import_module("opentelemetry.propagate")
        except ImportError:
            _propagate = None
        _looked = True
    return _propagate


def trace_headers() -> tuple[tuple[str, str], ...]:
    """The current OpenTelemetry context as (lowercase) headers; empty without an active span."""
    propagate = _propagator()
    if propagate is None:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((key.lower(), value) for key, value in carrier.items())
