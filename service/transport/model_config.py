"""What a served model looks like on the wire: its tensors, its Triton configuration, its statistics.

The tensors are described once (:func:`input_specs`, :func:`output_specs`) and
turned into both ``ModelMetadata`` (shapes with the batch dimension, OIP
datatypes) and ``ModelConfig`` (Triton's convention: with ``max_batch_size > 0``
the dims leave the batch dimension out; Triton's ``TYPE_*`` datatypes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.config import BatchingConfig
from service.engine.repository import ServedModel
from service.engine.statistics import Duration, ModelStatistics
from vision_client.protocol import IMAGE, LOGITS, PIXELS
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb
from vision_client.protocol.stubs.inference import model_config_pb2 as config_pb


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Open Inference Protocol datatype: "BYTES", "FP32"
    shape: tuple[int, ...]  # the batch dimension first; -1 is variable
    optional: bool = False  # the request may leave it out (IMAGE and PIXELS: exactly one of them)
    nchw: bool = False


_CONFIG_DATATYPES = {"BYTES": config_pb.TYPE_STRING, "FP32": config_pb.TYPE_FP32}


def input_specs(model: ServedModel) -> list[TensorSpec]:
    return [
        # [N, 1], as Triton declares a batched BYTES input (dims [1]); [N] is accepted too. Tools
        # that build requests from the config (perf_analyzer) need a non-empty dims list.
        TensorSpec(IMAGE, "BYTES", (-1, 1), optional=True),
        TensorSpec(PIXELS, "FP32", (-1, 3, -1, -1), optional=True, nchw=True),
    ]


def output_specs(model: ServedModel) -> list[TensorSpec]:
    return [TensorSpec(LOGITS, "FP32", (-1, model.num_outputs))]


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def model_config(
    model: ServedModel, batching: BatchingConfig, devices: list[torch.device], instances: int = 1
) -> config_pb.ModelConfig:
    """Triton's ``ModelConfig`` of ``model`` as this server runs it."""
    return config_pb.ModelConfig(
        name=model.name,
        platform=model.platform,
        version_policy=version_policy(model),
        max_batch_size=batching.max_batch_size,
        input=[
            config_pb.ModelInput(
                name=spec.name,
                data_type=_CONFIG_DATATYPES[spec.datatype],
                format=config_pb.ModelInput.FORMAT_NCHW if spec.nchw else config_pb.ModelInput.FORMAT_NONE,
                dims=spec.shape[1:],
                optional=spec.optional,
            )
            for spec in input_specs(model)
        ],
        output=[
            config_pb.ModelOutput(name=spec.name, data_type=_CONFIG_DATATYPES[spec.datatype], dims=spec.shape[1:])
            for spec in output_specs(model)
        ],
        dynamic_batching=config_pb.ModelDynamicBatching(
            max_queue_delay_microseconds=round(batching.max_queue_delay_ms * 1000),
            default_queue_policy=config_pb.ModelQueuePolicy(max_queue_size=batching.max_queue_size),
        ),
        instance_group=_instance_groups(model.name, devices, instances),
        parameters=precision_parameters(model),
    )


def version_policy(model: ServedModel) -> config_pb.ModelVersionPolicy:
    """Which versions are served, as Triton says it: a built-in model's one version is ``latest``
    (1); a fine-tuned model serves the versions its store keeps, whichever is the default (the
    newest, or the one rolled back to), so it lists them (``specific``)."""
    if model.base_model is None:
        return config_pb.ModelVersionPolicy(latest=config_pb.ModelVersionPolicy.Latest(num_versions=1))
    return config_pb.ModelVersionPolicy(
        specific=config_pb.ModelVersionPolicy.Specific(versions=[int(v) for v in model.available_versions])
    )


def precision_parameters(model: ServedModel) -> dict[str, config_pb.ModelParameter]:
    """What the network computes in, as Triton's free-form ``parameters`` (strings): ``precision``,
    and in a reduced one its agreement with float32 measured at load, ``precision_agreement_*``
    (the fields of vision.v1's PrecisionAgreement)."""
    values = {"precision": model.precision.dtype}
    agreement = model.precision.agreement
    if agreement is not None:
        values.update(
            precision_agreement_images=str(agreement.images),
            precision_agreement_images_source=agreement.images_source,
            precision_agreement_min_cosine=repr(agreement.min_cosine),
            precision_agreement_mean_cosine=repr(agreement.mean_cosine),
            precision_agreement_top1=repr(agreement.top1),
            precision_agreement_max_relative_error=repr(agreement.max_relative_error),
        )
    return {key: config_pb.ModelParameter(string_value=value) for key, value in values.items()}


def _instance_groups(name: str, devices: list[torch.device], count: int) -> list[config_pb.ModelInstanceGroup]:
    """``count`` instances per device (``--instances``): a CPU group, and one GPU group listing the GPUs."""
    groups = []
    cpus = [d for d in devices if d.type != "cuda"]
    gpus = [d.index or 0 for d in devices if d.type == "cuda"]
    if cpus:
        groups.append(
            config_pb.ModelInstanceGroup(name=f"{name}_cpu", kind=config_pb.ModelInstanceGroup.KIND_CPU, count=count)
        )
    if gpus:
        groups.append(
            config_pb.ModelInstanceGroup(
                name=f"{name}_gpu", kind=config_pb.ModelInstanceGroup.KIND_GPU, count=count, gpus=gpus
            )
        )
    return groups


def model_statistics(stats: ModelStatistics) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=stats.name,
        version=stats.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=batch.batch_size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for batch in stats.batches
        ],
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)
