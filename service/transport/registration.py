"""The services a gRPC port serves, and reflection over them: one registration for the single
process and for each protocol front end, so both ports answer the same methods and reflection
clients (grpcurl) see the same descriptors."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service.transport.call import GrpcAdapter
from vision_client.protocol.stubs.inference import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2
from vision_client.protocol.stubs.vision.v1 import fine_tuning_pb2, fine_tuning_pb2_grpc, models_pb2, models_pb2_grpc


def add_services(server: grpc.aio.Server, inference: Any, models: Any, fine_tuning: Any, health: Any) -> None:
    """Serve the inference, models and fine-tuning services (whose methods take ``(request, Call)``,
    adapted here to gRPC's ``(request, context)``), the health servicer (gRPC's own) on ``server``,
    and reflection over them."""
    inference = GrpcAdapter(inference, grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
    models = GrpcAdapter(models, models_pb2.DESCRIPTOR.services_by_name["Models"])
    fine_tuning = GrpcAdapter(fine_tuning, fine_tuning_pb2.DESCRIPTOR.services_by_name["FineTuning"])
    # grpc_tools generates the *_pb2_grpc modules without annotations (and without .pyi stubs).
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)  # type: ignore[no-untyped-call]
    models_pb2_grpc.add_ModelsServicer_to_server(models, server)  # type: ignore[no-untyped-call]
    fine_tuning_pb2_grpc.add_FineTuningServicer_to_server(fine_tuning, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            models_pb2.DESCRIPTOR.services_by_name["Models"].full_name,
            fine_tuning_pb2.DESCRIPTOR.services_by_name["FineTuning"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=_reflection_pool(),
    )


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Descriptors of every service we expose, for reflection clients (grpcurl)."""
    pool = descriptor_pool.DescriptorPool()
    files = (
        model_config_pb2.DESCRIPTOR,  # before grpc_service, which imports it
        grpc_service_pb2.DESCRIPTOR,
        models_pb2.DESCRIPTOR,
        fine_tuning_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    )
    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)  # type: ignore[no-untyped-call]  # types-protobuf leaves DescriptorPool.Add unannotated
    return pool
