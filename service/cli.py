"""``vision-serve``: run the server, or ``vision-serve fetch-weights`` to pre-seed weights.

Every option can also be set by an environment variable ``VISION_SERVE_<OPTION>``
(``--max-batch-size`` is ``VISION_SERVE_MAX_BATCH_SIZE``); a flag wins over the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.config import AUTH_SCOPES, DEFAULT_MODELS, BatchingConfig, FineTuneLimits, RuntimeConfig, ServeConfig
from service.errors import VisionServeError
from service.runtimes.base import RUNTIME_CHOICES
from service.runtimes.export import default_cache_dir

ENV_PREFIX = "VISION_SERVE_"
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = {"1", "true", "yes", "on"}


def _model_list(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one model")
    return names


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {number}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {number}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {number}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {number}")
    return number


class _EnvDefaults:
    """Adds options whose default comes from ``VISION_SERVE_<OPTION>`` when it is set."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self._parser = parser
        self._environ = environ

    def add(self, flag: str, *, default: object, help: str, **kwargs: Any) -> None:
        """``kwargs`` go to ``ArgumentParser.add_argument`` as they are (its options each have their own type)."""
        env = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        if env in self._environ:
            default = self._environ[env]
            if kwargs.get("action") is argparse.BooleanOptionalAction:
                default = default.strip().lower() in _TRUE
        self._parser.add_argument(flag, default=default, help=f"{help} [env {env}; default: %(default)s]", **kwargs)


def build_serve_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision-serve",
        description="Serve torchvision classifiers over gRPC (Open Inference Protocol). "
        "`vision-serve fetch-weights --help` pre-downloads pretrained weights.",
    )
    d = ServeConfig()
    b = BatchingConfig()
    opt = _EnvDefaults(parser, environ)
    opt.add("--host", default=d.host, help="address to listen on")
    opt.add("--grpc-port", default=d.grpc_port, type=_port, help="gRPC port (0: any free port)")
    opt.add("--metrics-port", default=d.metrics_port, type=_port, help="Prometheus /metrics port")
    opt.add("--metrics-host", default=d.metrics_host, help="address of the metrics port (default: --host)")
    opt.add(
        "--health-port",
        default=d.health_port,
        type=_port,
        help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes when gRPC uses TLS)",
    )
    opt.add("--models", default=",".join(d.models), type=_model_list, help="comma-separated models to serve")
    opt.add(
        "--weights",
        default=d.weights,
        help="'pretrained' (torchvision's, cached under TORCH_HOME), 'random' (seeded, for tests), "
        "or a directory of <model>.pth state dicts",
    )
    opt.add("--device", default=d.device, help="'auto', 'cpu', 'cuda' or a list such as cuda:0,cuda:1")
    opt.add("--dtype", default=d.dtype, choices=DTYPE_CHOICES, help="compute dtype on CUDA")
    opt.add(
        "--channels-last", default=d.channels_last, action=argparse.BooleanOptionalAction, help="NHWC memory format"
    )
    r = RuntimeConfig()
    opt.add(
        "--runtime",
        default=r.name,
        choices=RUNTIME_CHOICES,
        help="what runs the networks: auto (ONNX Runtime on CPUs, PyTorch on CUDA), torch, onnxruntime, "
        "openvino, or fastest (time each installed runtime at load, keep the fastest)",
    )
    opt.add(
        "--runtime-cache",
        default=str(default_cache_dir(environ)),
        type=Path,
        help="directory of networks exported for onnxruntime/openvino (shareable; rebuilt when missing or corrupt)",
    )
    opt.add(
        "--runtime-threads",
        default=r.threads,
        type=_non_negative_int,
        help="intra-op threads of the runtime per forward pass (0: one per core)",
    )
    opt.add("--max-batch-size", default=b.max_batch_size, type=_positive_int, help="images per forward pass")
    opt.add(
        "--max-queue-delay-ms",
        default=b.max_queue_delay_ms,
        type=_non_negative_float,
        help="longest wait for a batch to fill",
    )
    opt.add(
        "--max-queue-size",
        default=b.max_queue_size,
        type=_positive_int,
        help="images queued per model before RESOURCE_EXHAUSTED",
    )
    opt.add("--decode-threads", default=d.decode_threads, type=int, help="image decoding threads (0: one per core)")
    opt.add("--max-image-pixels", default=d.max_image_pixels, type=_positive_int, help="largest decoded image (w*h)")
    opt.add(
        "--max-request-images",
        default=d.max_request_images,
        type=_positive_int,
        help="images one request may carry, checked before any is decoded (default: --max-queue-size)",
    )
    opt.add(
        "--max-stream-in-flight",
        default=d.max_stream_in_flight,
        type=_positive_int,
        help="requests of one ModelStreamInfer stream worked on at once; the stream is not read further meanwhile",
    )
    opt.add("--max-message-bytes", default=d.max_message_bytes, type=_positive_int, help="largest gRPC message")
    opt.add(
        "--model-store",
        default=str(Path("~/.local/share/vision-serving/models").expanduser()),
        type=Path,
        help="directory of fine-tuned models (shared by replicas)",
    )
    opt.add(
        "--store-poll-seconds",
        default=d.store_poll_seconds,
        type=_positive_float,
        help="how often to look for models other replicas wrote to the store",
    )
    f = FineTuneLimits()
    for flag, default, meaning in (
        ("--max-finished-jobs", f.max_finished_jobs, "finished fine-tuning job records kept in the model store"),
        ("--max-queued-jobs", f.max_queued_jobs, "fine-tuning jobs queued or running before RESOURCE_EXHAUSTED"),
        ("--max-job-uploads", f.max_uploads, "CreateJob streams receiving examples at once before RESOURCE_EXHAUSTED"),
        ("--max-job-examples", f.max_examples, "examples per fine-tuning job"),
        ("--max-job-bytes", f.max_total_bytes, "bytes of one job's images, labels and targets together"),
        ("--max-head-parameters", f.max_head_parameters, "trainable parameters of a fine-tuned head"),
        ("--max-labels", f.max_labels, "classes of one fine-tuning job"),
        ("--max-label-length", f.max_label_length, "UTF-8 bytes of one class name"),
    ):
        opt.add(flag, default=default, type=_positive_int, help=meaning)
    opt.add(
        "--auth-token-file",
        default=None,
        type=Path,
        help="bearer tokens, one a line, re-read when the file changes; management RPCs need one "
        "(without this file they are accepted from loopback only)",
    )
    opt.add(
        "--auth-scope",
        default=d.auth_scope,
        choices=AUTH_SCOPES,
        help="what the tokens protect: 'management' RPCs, or 'all' RPCs (health stays open)",
    )
    opt.add("--tls-cert-file", default=None, type=Path, help="PEM certificate chain: the gRPC port speaks TLS")
    opt.add("--tls-key-file", default=None, type=Path, help="PEM private key of --tls-cert-file")
    opt.add(
        "--tls-client-ca-file",
        default=None,
        type=Path,
        help="PEM CA bundle: mutual TLS, clients need a certificate it signed",
    )
    opt.add(
        "--drain-seconds", default=d.drain_seconds, type=_non_negative_float, help="grace for in-flight work on SIGTERM"
    )
    opt.add("--log-level", default=d.log_level, choices=LOG_LEVELS, help="log level")
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    # argparse checks choices on the command line only, not on defaults taken from the environment.
    choices = (
        ("dtype", DTYPE_CHOICES),
        ("log_level", LOG_LEVELS),
        ("auth_scope", AUTH_SCOPES),
        ("runtime", RUNTIME_CHOICES),
    )
    for option, allowed in choices:
        value = getattr(args, option)
        if value not in allowed:
            flag = "--" + option.replace("_", "-")
            raise SystemExit(f"vision-serve: error: {flag} {value!r}: choose one of {', '.join(allowed)}")
    if args.health_port and args.health_port in (args.grpc_port, args.metrics_port):
        raise SystemExit("vision-serve: error: --health-port must differ from --grpc-port and --metrics-port")
    if args.max_queue_size < args.max_batch_size:
        raise SystemExit("vision-serve: error: --max-queue-size must be at least --max-batch-size")
    if args.max_request_images is not None and args.max_request_images > args.max_queue_size:
        raise SystemExit(
            "vision-serve: error: --max-request-images must not exceed --max-queue-size "
            "(a larger request could never be queued)"
        )
    return ServeConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host or None,
        health_port=args.health_port,
        models=tuple(args.models),
        weights=args.weights,
        device=args.device,
        dtype=args.dtype,
        channels_last=args.channels_last,
        batching=BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue_size=args.max_queue_size,
        ),
        runtime=RuntimeConfig(name=args.runtime, cache_dir=args.runtime_cache, threads=args.runtime_threads),
        decode_threads=args.decode_threads,
        max_image_pixels=args.max_image_pixels,
        max_request_images=args.max_request_images,
        max_stream_in_flight=args.max_stream_in_flight,
        max_message_bytes=args.max_message_bytes,
        model_store=args.model_store,
        store_poll_seconds=args.store_poll_seconds,
        fine_tuning=FineTuneLimits(
            max_finished_jobs=args.max_finished_jobs,
            max_queued_jobs=args.max_queued_jobs,
            max_uploads=args.max_job_uploads,
            max_examples=args.max_job_examples,
            max_total_bytes=args.max_job_bytes,
            max_head_parameters=args.max_head_parameters,
            max_labels=args.max_labels,
            max_label_length=args.max_label_length,
        ),
        auth_token_file=args.auth_token_file,
        auth_scope=args.auth_scope,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file,
        drain_seconds=args.drain_seconds,
        log_level=args.log_level,
    )


def fetch_weights(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vision-serve fetch-weights",
        description="Download pretrained weights into torch's cache (TORCH_HOME) ahead of serving.",
    )
    parser.add_argument(
        "--models",
        type=_model_list,
        default=environ.get(ENV_PREFIX + "MODELS", ",".join(DEFAULT_MODELS)),
        help="comma-separated models (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    from service.models import fetch_pretrained, get_model_spec

    for name in args.models:
        path = fetch_pretrained(get_model_spec(name))
        print(f"{name}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ
    try:
        if argv[:1] == ["fetch-weights"]:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            return fetch_weights(argv[1:], environ)
        config = config_from_args(build_serve_parser(environ).parse_args(argv))
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from service.server import serve

        return asyncio.run(serve(config))
    except VisionServeError as exc:
        print(f"vision-serve: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
