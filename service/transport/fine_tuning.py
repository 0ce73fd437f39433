"""``vision.v1.FineTuning``: create, watch, get, list and cancel jobs; delete fine-tuned models."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from service.errors import InvalidInputError
from service.finetune.job import Job, JobEvent, JobState
from service.finetune.manager import JobManager
from service.finetune.spec import config_from_wire
from service.transport.call import Call
from service.transport.limits import UploadPace, UploadPeers, paced
from vision_client.protocol import FineTuneConfig, to_message
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2 as pb
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2_grpc as pb_grpc

_STATES = {
    JobState.QUEUED: pb.QUEUED,
    JobState.RUNNING: pb.RUNNING,
    JobState.SUCCEEDED: pb.SUCCEEDED,
    JobState.FAILED: pb.FAILED,
    JobState.CANCELLED: pb.CANCELLED,
}


class FineTuningServicer(pb_grpc.FineTuningServicer):
    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs
        self._peers = UploadPeers(jobs.limits.max_uploads_per_peer)

    def upload_pace(self) -> UploadPace:
        """The pace a new upload must keep (``--upload-idle-seconds``, ``--max-upload-seconds``)."""
        return UploadPace(self._jobs.limits.upload_idle_s, self._jobs.limits.max_upload_s)

    async def CreateJob(
        self,
        request_iterator: AsyncIterator[pb.CreateJobRequest],
        call: Call,
    ) -> pb.Job:
        messages = paced(request_iterator, self.upload_pace(), "the next CreateJobRequest")
        return await self.create_job(messages, call)

    @property
    def tracing_enabled(self) -> bool:
        return self._jobs.tracing_enabled

    async def create_job(self, messages: AsyncIterator[pb.CreateJobRequest], call: Call) -> pb.Job:
        """A job from its messages, which the caller reads within an :class:`UploadPace`; ``call``:
        its peer, whose uploads at once are bounded, and its W3C trace context, which the job's
        trace continues."""
        carrier = dict(call.carrier or {}) if self.tracing_enabled else None
        with self._peers.hold(call.peer), self._jobs.upload():
            config: FineTuneConfig | None = None
            collector = None
            async for message in messages:
                payload = message.WhichOneof("payload")
                if config is None:
                    if payload != "config":
                        raise InvalidInputError("the first CreateJobRequest must carry the config, then examples")
                    config = self._jobs.check_config(config_from_wire(message.config))
                    collector = self._jobs.collector(config)
                elif payload == "config":
                    raise InvalidInputError("send the config once, in the first CreateJobRequest")
                elif payload == "examples":
                    assert collector is not None
                    if config.dataset and message.examples.examples:
                        raise InvalidInputError(
                            "a job that names a dataset sends no examples: its images are the dataset's; send the "
                            "config alone, or leave dataset empty and upload the images"
                        )
                    for example in message.examples.examples:
                        collector.add(example.image, example.label, list(example.target))
            if config is None or collector is None:
                raise InvalidInputError("no config was sent: the first CreateJobRequest must carry it")
            return job_to_proto(await self._jobs.submit(config, collector, carrier=carrier))

    async def WatchJob(self, request: pb.WatchJobRequest, call: Call) -> AsyncIterator[pb.JobEvent]:
        async for event in self._jobs.watch(request.job_id):
            yield event_to_proto(event)

    async def GetJob(self, request: pb.GetJobRequest, call: Call) -> pb.Job:
        return job_to_proto(await self._jobs.get(request.job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, call: Call) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job_to_proto(job) for job in await self._jobs.list()])

    async def CancelJob(self, request: pb.CancelJobRequest, call: Call) -> pb.Job:
        return job_to_proto(await self._jobs.cancel(request.job_id))

    async def DeleteModel(
        self,
        request: pb.DeleteModelRequest,
        call: Call,
    ) -> pb.DeleteModelResponse:
        self._jobs.delete_model(request.name)
        return pb.DeleteModelResponse(deleted=True)


def job_to_proto(job: Job) -> pb.Job:
    m = job.metrics
    return pb.Job(
        id=job.id,
        state=_STATES[job.state],
        config=to_message(job.config),
        error=job.error,
        examples=job.example_count,
        labels=job.labels,
        metrics=pb.JobMetrics(
            train_loss=_number(m.train_loss),
            validation_loss=_number(m.validation_loss),
            validation_accuracy=_number(m.validation_accuracy),
            best_epoch=m.best_epoch,
            epochs_run=m.epochs_run,
            train_examples=m.train_examples,
            validation_examples=m.validation_examples,
            train_seconds=_number(m.train_seconds),
            class_metrics=[
                pb.ClassMetrics(precision=figures.precision, recall=figures.recall, support=figures.support)
                for figures in m.per_class()
            ],
            confusion_matrix=[
                pb.ConfusionCell(actual=actual, predicted=predicted, count=count)
                for actual, predicted, count in m.confusion
            ],
        ),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        epoch_metrics=[
            pb.EpochMetrics(
                epoch=point.epoch,
                train_loss=_number(point.train_loss),
                validation_loss=_number(point.validation_loss),
                validation_accuracy=_number(point.validation_accuracy),
            )
            for point in job.curve
        ],
    )


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=event.job_id,
        state=_STATES[event.state],
        kind=event.kind,
        epoch=event.epoch,
        epochs=event.epochs,
        train_loss=_number(event.train_loss),
        validation_loss=_number(event.validation_loss),
        validation_accuracy=_number(event.validation_accuracy),
        eta_seconds=event.eta_seconds,
        progress=event.progress,
        message=event.message,
    )


def _number(value: float | None) -> float:
    """NaN (not measured) travels as 0: proto3 has no "absent" for doubles."""
    return 0.0 if value is None or math.isnan(value) else float(value)
