"""Records of finished jobs, kept in the store so that they survive restarts and are
shared by replicas: ``.jobs/<finished-ms>-<job id>.json`` in the store, at most
``max_finished_jobs`` of them (the oldest are deleted). A record holds the job's
config, state, labels, error, metrics and curve (each epoch's figures); never its images.
"""

from __future__ import annotations

import json
import logging
import re

from service.errors import StoreEntryError
from service.finetune.job import EpochMetrics, Job, JobState
from service.finetune.store import parse_json
from service.finetune.trainer import TrainMetrics
from service.host.files import FileRefused
from service.storage import ObjectStore, StoreLocation, open_objects
from vision_client.errors import InvalidInputError as ConfigError
from vision_client.protocol import from_dict, to_dict

log = logging.getLogger(__name__)

JOBS_FOLDER = ".jobs"  # hidden: never taken for a model's folder
JOB_ID = re.compile(r"[0-9a-f]{12}")
_RECORD = re.compile(r"(?P<finished>[0-9]{13})-(?P<id>[0-9a-f]{12})\.json")
MAX_RECORD_BYTES = 1024 * 1024
RECORD_FORMAT_VERSION = 1


class JobHistory:
    def __init__(self, location: StoreLocation | ObjectStore, max_records: int) -> None:
        self.objects = open_objects(location)
        self.max_records = max_records

    def save(self, job: Job) -> None:
        """Write ``job``'s record and delete the oldest records beyond the limit (blocking)."""
        record = {
            "format_version": RECORD_FORMAT_VERSION,
            "id": job.id,
            "state": job.state.value,
            "config": to_dict(job.config),
            "labels": job.labels,
            "examples": job.example_count,
            "error": job.error,
            "metrics": job.metrics.to_json(),
            "curve": [point.to_json() for point in job.curve],
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
        }
        name = f"{int(job.finished_at * 1000):013d}-{job.id}.json"
        self.objects.write(f"{JOBS_FOLDER}/{name}", json.dumps(record).encode())
        self.prune()

    def prune(self) -> None:
        records = self._names()
        for name in records[: max(0, len(records) - self.max_records)]:
            self.objects.delete(f"{JOBS_FOLDER}/{name}")

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        for name in self._names():
            if name.endswith(f"-{job_id}.json"):
                return self._read(name)
        return None

    def recent(self) -> list[Job]:
        """The newest ``max_records`` records that can be read."""
        jobs = (self._read(name) for name in self._names()[-self.max_records :])
        return [job for job in jobs if job is not None]

    def _names(self) -> list[str]:
        """Record names, oldest first."""
        names = []
        for info in self.objects.list(f"{JOBS_FOLDER}/"):
            if info.error:  # the records' folder cannot be listed: say so, never "no such job"
                raise OSError(f"cannot list {info.key or JOBS_FOLDER}: {info.error}")
            names.append(info.key.removeprefix(f"{JOBS_FOLDER}/"))
        return sorted(name for name in names if _RECORD.fullmatch(name))

    def _read(self, name: str) -> Job | None:
        key = f"{JOBS_FOLDER}/{name}"
        try:
            data = parse_json(self.objects.read(key, MAX_RECORD_BYTES), name)
            return job_from_record(data)
        except FileNotFoundError:
            return None  # pruned by another replica meanwhile
        except (FileRefused, StoreEntryError, ConfigError, KeyError, TypeError, ValueError, OverflowError) as exc:
            log.warning("job record %s of %s cannot be read; ignoring it: %s", key, self.objects.location, exc)
            return None


def job_from_record(data: object) -> Job:
    if not isinstance(data, dict) or data.get("format_version") != RECORD_FORMAT_VERSION:
        raise ValueError("not a job record of a known format_version")
    job = Job(
        id=str(data["id"]),
        config=from_dict(data["config"] if "config" in data else _older_config(data["spec"])),
        labels=[str(label) for label in data["labels"]],
        example_count=int(data["examples"]),
        state=JobState(data["state"]),
        error=str(data["error"]),
        created_at=float(data["created_at"]),
        started_at=float(data["started_at"]),
        finished_at=float(data["finished_at"]),
        metrics=TrainMetrics.from_json(data["metrics"]),
        curve=_curve(data.get("curve", [])),  # records of older servers have none
    )
    if not job.state.terminal or not JOB_ID.fullmatch(job.id):
        raise ValueError("a job record must be of a finished job with a valid id")
    return job


def _curve(data: object) -> list[EpochMetrics]:
    if not isinstance(data, list):
        raise ValueError("a job record's curve must be a list")
    return [EpochMetrics.from_json(point) for point in data]


def _older_config(spec: object) -> object:
    """A record of an older server: its config was "spec", with Adam's betas as one pair."""
    if not isinstance(spec, dict) or not isinstance(spec.get("optimizer"), dict):
        raise ValueError("a job record's spec must be a JSON object with an optimizer")
    optimizer = dict(spec["optimizer"])
    optimizer["beta1"], optimizer["beta2"] = optimizer.pop("betas")
    return {**spec, "optimizer": optimizer}
