"""Spans of store operations: an :class:`~service.storage.objects.ObjectStore` that records one span
per operation (``store.read``, ``store.write``, ``store.list``...) around another.

Built only where tracing is on (:meth:`service.telemetry.tracing.Tracing.store`); with tracing off the store is
not wrapped at all. A span is made only as the child of a span that is current and recording where
the operation runs: a fine-tuning job's ``publish`` (its phases are current spans) and the worker
threads ``asyncio.to_thread`` starts from there, which carry the caller's context. An operation
with no such parent makes no span, and never a root: the store sync's polls (every few seconds,
from a background task) are not traced, as they would bury the traces that explain something in
a trace per poll, and a change a poll finds is not anybody's request.

Attributes: ``vision.store.kind`` (directory, s3), ``vision.store.key`` (``vision.store.prefix``
for a listing, with ``vision.store.objects``), ``vision.store.bytes`` for what was read or written
(never the contents), and ``vision.store.outcome``: ``ok``, ``missing`` (a head that found
nothing), or the exception's class, which also marks the span as an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from service.storage.objects import ObjectInfo, ObjectStore, store_kind

T = TypeVar("T")


class TracedObjects:
    """``objects``, with a span per operation under the current span (see the module docstring)."""

    def __init__(self, objects: ObjectStore, tracer: trace.Tracer) -> None:
        self.objects = objects
        self._tracer = tracer
        self.kind = store_kind(objects)

    @property
    def location(self) -> str:
        return self.objects.location

    def _span(self, operation: str, attributes: dict[str, str | int]) -> trace.Span | None:
        parent = trace.get_current_span()
        if not parent.is_recording():
            return None
        return self._tracer.start_span(f"store.{operation}", attributes={"vision.store.kind": self.kind, **attributes})

    def _call(self, operation: str, key: str, call: Callable[[], T], sent: int | None = None) -> T:
        attributes: dict[str, str | int] = {"vision.store.key": key}
        if sent is not None:
            attributes["vision.store.bytes"] = sent
        span = self._span(operation, attributes)
        if span is None:
            return call()
        try:
            result = call()
        except BaseException as exc:
            _failed(span, exc)
            raise
        if isinstance(result, bytes):
            span.set_attribute("vision.store.bytes", len(result))
        span.set_attribute("vision.store.outcome", "missing" if result is None and operation == "head" else "ok")
        span.end()
        return result

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        span = self._span("list", {"vision.store.prefix": prefix})
        if span is None:
            yield from self.objects.list(prefix)
            return
        count, failure = 0, None
        try:
            for info in self.objects.list(prefix):
                count += 1
                yield info
        except GeneratorExit:  # the caller stopped early: what it listed went well
            raise
        except BaseException as exc:
            failure = exc
            raise
        finally:
            span.set_attribute("vision.store.objects", count)
            if failure is None:
                span.set_attribute("vision.store.outcome", "ok")
                span.end()
            else:
                _failed(span, failure)

    def head(self, key: str) -> ObjectInfo | None:
        return self._call("head", key, lambda: self.objects.head(key))

    def read(self, key: str, max_bytes: int) -> bytes:
        return self._call("read", key, lambda: self.objects.read(key, max_bytes))

    def write(self, key: str, data: bytes) -> ObjectInfo:
        return self._call("write", key, lambda: self.objects.write(key, data), len(data))

    def create(self, key: str, data: bytes) -> ObjectInfo:
        return self._call("create", key, lambda: self.objects.create(key, data), len(data))

    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        return self._call("replace", key, lambda: self.objects.replace(key, data, etag), len(data))

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.objects.delete(key))


def _failed(span: trace.Span, exc: BaseException) -> None:
    span.set_attribute("vision.store.outcome", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.end()
