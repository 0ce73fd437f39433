"""The server's log: its format (``--log-format text`` or ``json``), the ids that tie a line to
a request and its trace, and the opt-in access log (``--access-log``).

A request's ids (:class:`RequestIds`: the request's own id, its trace and span) live in a context
variable for as long as the request is handled, so that every line logged about it — by the
transport, the data plane, or anything they call on the event loop or through ``asyncio.to_thread``
— carries them: as ``trace_id``/``span_id``/``request_id`` keys in JSON, as a ``[trace=... request=...]``
suffix in text. Lines not about a request carry none.

The access log is one line per inference request on logger ``vision.access``: method, protocol,
model, version, status, duration and the request's and answer's message bytes; never a payload,
a header or a token.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = "vision.access"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has: anything else on a record came as ``extra`` and goes into the JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_IDS = ("request_id", "trace_id", "span_id")


@dataclass(frozen=True)
class RequestIds:
    request_id: str
    trace_id: str = ""
    span_id: str = ""


_CURRENT: ContextVar[RequestIds | None] = ContextVar("vision_request_ids", default=None)


def new_request_id() -> str:
    return os.urandom(8).hex()


@contextmanager
def request_ids(ids: RequestIds) -> Iterator[None]:
    """Every line logged within the block (in this context) carries ``ids``."""
    token = _CURRENT.set(ids)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_ids() -> RequestIds | None:
    return _CURRENT.get()


class RequestIdsFilter(logging.Filter):
    """Puts the current request's ids on each record (empty strings outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _CURRENT.get()
        for name in _IDS:
            if not hasattr(record, name):
                setattr(record, name, getattr(ids, name) if ids is not None else "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the request's ids where
    the line is about one, what the call passed as ``extra``, and a traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name in _STANDARD or (name in _IDS and not value):
                continue
            line[name] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual text line, with ``[trace=... request=...]`` at its end when it is about a request."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", "")
        if not request_id:
            return text
        trace_id = getattr(record, "trace_id", "")
        suffix = f" [trace={trace_id} request={request_id}]" if trace_id else f" [request={request_id}]"
        head, newline, rest = text.partition("\n")  # after the message, before a traceback
        return head + suffix + newline + rest


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger's one handler (stderr), in ``log_format``, at ``level``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdsFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


_ACCESS = logging.getLogger(ACCESS_LOGGER)


def access(
    *,
    method: str,
    protocol: str,
    model: str,
    version: str,
    status: str,
    seconds: float,
    bytes_in: int,
    bytes_out: int,
) -> None:
    """One access log line (the fields also as ``extra``, which JSON shows as keys)."""
    fields = {
        "method": method,
        "protocol": protocol,
        "model": model,
        "version": version,
        "status": status,
        "duration_ms": round(seconds * 1e3, 3),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }
    _ACCESS.info(
        "%s %s model=%s version=%s status=%s duration_ms=%.3f bytes_in=%d bytes_out=%d",
        protocol,
        method,
        model,
        version,
        status,
        fields["duration_ms"],
        bytes_in,
        bytes_out,
        extra=fields,
    )
