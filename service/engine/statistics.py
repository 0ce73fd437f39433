"""Per model and version inference statistics, as Triton's statistics extension reports them.

Fed by the same events as the Prometheus metrics (``ServerMetrics.record_batch``
and ``record_request``), so both always tell the same story. Everything is
cumulative since the server started, also across an unload and a load, like the
Prometheus counters. Triton's definitions, which this follows:

- ``success`` / ``fail``: requests answered, and their time from arrival to answer;
- ``queue``, ``compute_input``, ``compute_infer``, ``compute_output``: counted per
  request (here: per work item, which is one request unless a request holds
  more than ``--max-batch-size`` images and is split), each item charged with
  the whole duration of the batch it ran in;
- ``batch_stats``: per batch size (images), the number of batches and their durations;
- ``inference_count``: images run; ``execution_count``: batches run;
  ``last_inference``: milliseconds since the epoch of the last batch.

Thread-safe: batches are recorded from worker threads, requests from the event loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from service.engine.runtime import BatchStats, PhaseTimes


@dataclass(frozen=True)
class Duration:
    """How many events, and their total duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, times: int = 1) -> Duration:
        return Duration(self.count + times, self.ns + times * _ns(seconds))


@dataclass(frozen=True)
class BatchDurations:
    """Batches of one size: how many ran, and their compute phases."""

    batch_size: int
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


@dataclass(frozen=True)
class ModelStatistics:
    """A snapshot of one model version's statistics."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: tuple[BatchDurations, ...] = ()  # by batch size, ascending


@dataclass
class _Record:
    stats: ModelStatistics
    batches: dict[int, BatchDurations] = field(default_factory=dict)


class StatisticsCollector:
    """Accumulates :class:`ModelStatistics` per (model, version); no gRPC in here."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], _Record] = {}
        self._lock = threading.Lock()

    def record_batch(self, model: str, version: str, stats: BatchStats) -> None:
        phases = stats.phases or PhaseTimes(infer_seconds=stats.compute_seconds)
        items = len(stats.queue_seconds)
        with self._lock:
            record = self._record(model, version)
            s = record.stats
            queue = s.queue
            for seconds in stats.queue_seconds:
                queue = queue.add(seconds)
            record.stats = replace(
                s,
                last_inference_ms=int(time.time() * 1000),
                inference_count=s.inference_count + stats.images,
                execution_count=s.execution_count + 1,
                queue=queue,
                compute_input=s.compute_input.add(phases.input_seconds, items),
                compute_infer=s.compute_infer.add(phases.infer_seconds, items),
                compute_output=s.compute_output.add(phases.output_seconds, items),
            )
            batch = record.batches.get(stats.images, BatchDurations(stats.images))
            record.batches[stats.images] = BatchDurations(
                stats.images,
                batch.compute_input.add(phases.input_seconds),
                batch.compute_infer.add(phases.infer_seconds),
                batch.compute_output.add(phases.output_seconds),
            )

    def record_request(self, model: str, version: str, ok: bool, seconds: float) -> None:
        with self._lock:
            record = self._record(model, version)
            s = record.stats
            if ok:
                record.stats = replace(s, success=s.success.add(seconds))
            else:
                record.stats = replace(s, fail=s.fail.add(seconds))

    def get(self, model: str, version: str) -> ModelStatistics:
        """The statistics of ``model`` at ``version`` (all zero if it never ran)."""
        with self._lock:
            record = self._records.get((model, version))
            if record is None:
                return ModelStatistics(model, version)
            return replace(record.stats, batches=tuple(record.batches[size] for size in sorted(record.batches)))

    def _record(self, model: str, version: str) -> _Record:
        record = self._records.get((model, version))
        if record is None:
            record = self._records[(model, version)] = _Record(ModelStatistics(model, version))
        return record


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))
