"""The server's options: one table, from which the argument parser, the ``VISION_SERVE_<OPTION>``
variables, the :class:`ServeConfig` and ``docs/configuration.md`` are all made.

Each :class:`Option` names the config field it sets (a dotted path into ``ServeConfig``); its
default is that field's default in ``service/config.py``, unless it depends on the environment
(directories under ``$XDG_*``). Adding an option is one entry here (and the field it sets);
``python -m service.options > docs/configuration.md`` writes the docs, and a test fails when
they differ.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import (
    AUTH_SCOPES,
    RUNTIME_CHOICES,
    SPIN_CHOICES,
    BatchingConfig,
    DtypeChoice,
    FineTuneLimits,
    RuntimeConfig,
    ServeConfig,
    default_cache_dir,
)
from service.storage.location import StoreLocation, parse_store_location
from service.telemetry.logs import LOG_FORMATS

ENV_PREFIX = "VISION_SERVE_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STORE_OFF = ("none", "off")  # --model-store none: fine-tuning is off
PORT_OFF = ("none", "off")  # --http-port none: no HTTP port
_TRUE = {"1", "true", "yes", "on"}
# The config's sections: a field path "batching.max_batch_size" sets BatchingConfig.max_batch_size.
SECTIONS: dict[str, type[Any]] = {"batching": BatchingConfig, "runtime": RuntimeConfig, "fine_tuning": FineTuneLimits}


# -- value parsers (argparse types) -----------------------------------------------------------


def model_list(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one model")
    return names


def _checked(
    name: str, convert: Callable[[str], Any], accept: Callable[[Any], bool], problem: str
) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, refuse it with ``problem`` unless ``accept``."""

    def parse(value: str) -> Any:
        number = convert(value)
        if not accept(number):
            raise argparse.ArgumentTypeError(problem.format(number))
        return number

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _checked("positive_int", int, lambda n: n >= 1, "must be at least 1, got {}")
MAX_INSTANCES = 64  # model instances per device: each is a thread, and maybe a copy of the weights
instance_count = _checked(
    "instance_count", int, lambda n: 1 <= n <= MAX_INSTANCES, f"must be 1 to {MAX_INSTANCES}, got {{}}"
)
MAX_FRONTENDS = 64  # protocol processes: each holds its connections, a decode pool and a transfer arena
frontend_count = _checked(
    "frontend_count",
    lambda text: 0 if text.strip().lower() == "auto" else int(text),
    lambda n: 0 <= n <= MAX_FRONTENDS,
    f"must be 'auto' or 1 to {MAX_FRONTENDS}, got {{}}",
)
MAX_KEEP_VERSIONS = 100  # versions kept per fine-tuned model: each is a head (and its manifest) in the store
keep_count = _checked(
    "keep_count", int, lambda n: 1 <= n <= MAX_KEEP_VERSIONS, f"must be 1 to {MAX_KEEP_VERSIONS}, got {{}}"
)
non_negative_int = _checked("non_negative_int", int, lambda n: n >= 0, "must not be negative, got {}")
port = _checked("port", int, lambda n: 0 <= n <= 65535, "not a port: {}")
positive_float = _checked("positive_float", float, lambda n: n > 0, "must be positive, got {}")
non_negative_float = _checked("non_negative_float", float, lambda n: n >= 0, "must not be negative, got {}")


fraction = _checked("fraction", float, lambda n: 0.0 <= n <= 1.0, "must be 0 to 1, got {}")


def dtype_choice(value: str) -> DtypeChoice:
    """``--dtype``: a precision, or a default and ``model=precision`` pairs (:meth:`DtypeChoice.parse`)."""
    try:
        choice = DtypeChoice.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    from service.models import list_models  # torch: only for a --dtype that names models

    unknown = [model for model, _ in choice.models if model not in list_models()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)}: not a built-in model; name one of {', '.join(list_models())} "
            "(a fine-tuned model computes in its base model's precision)"
        )
    return choice


def host_list(value: str) -> tuple[str, ...]:
    """Host names, comma-separated (may be empty): lower-case, without a trailing dot."""
    names = tuple(name.strip().lower().rstrip(".") for name in value.split(",") if name.strip())
    for name in names:
        if any(character in name for character in ":/[]@ \t") or not name.isascii():
            raise argparse.ArgumentTypeError(f"{name!r} is not a host name: give names only (no port, no scheme)")
    return names


def port_or_off(value: str) -> int | None:
    """A port, or None (the port is not opened) for ``none``/``off``."""
    if value.strip().lower() in PORT_OFF:
        return None
    number: int = port(value)
    return number


def optional_text(value: str) -> str | None:
    return value or None


def store_location(value: str) -> StoreLocation | None:
    """A model store directory or ``s3://bucket/prefix``, or None (fine-tuning off) for ``none``/``off``/empty."""
    if value.strip().lower() in (*STORE_OFF, ""):
        return None
    try:
        return parse_store_location(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dataset_roots(value: str) -> tuple[StoreLocation, ...]:
    """``--dataset-roots``: directories and ``s3://bucket/prefix`` URLs, comma-separated (may be empty)."""
    roots: list[StoreLocation] = []
    for text in (part.strip() for part in value.split(",")):
        if not text or text.lower() in STORE_OFF:
            continue
        try:
            root = parse_store_location(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("the model store", "a dataset root")) from None
        roots.append(root.absolute() if isinstance(root, Path) else root)
    return tuple(roots)


def default_store_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/vision-serving/models``, or ``~/.local/share/vision-serving/models``."""
    base = environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(base) / "vision-serving" / "models"


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    flag: str
    field: str  # dotted path into ServeConfig
    help: str
    type: Callable[[str], Any] | None = None  # None: the text as it is
    choices: tuple[str, ...] | None = None
    boolean: bool = False  # --flag / --no-flag
    environ_default: Callable[[Mapping[str, str]], object] | None = None  # a default that depends on the environment
    documented_default: str | None = None  # how the docs show such a default

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def default(self, environ: Mapping[str, str]) -> object:
        if self.environ_default is not None:
            return self.environ_default(environ)
        value: Any = ServeConfig()
        for part in self.field.split("."):
            value = getattr(value, part)
        return value


def _limit(flag: str, field: str, meaning: str) -> Option:
    return Option(flag, f"fine_tuning.{field}", meaning, positive_int)


OPTIONS: tuple[Option, ...] = (
    Option("--host", "host", "address to listen on"),
    Option("--grpc-port", "grpc_port", "gRPC port (0: any free port)", port),
    Option(
        "--http-port",
        "http_port",
        "HTTP/REST port: KServe v2 REST with Triton's extensions (0: any free port; 'none': no HTTP port); "
        "HTTPS with the gRPC port's --tls-* files when they are set",
        port_or_off,
    ),
    Option("--metrics-port", "metrics_port", "Prometheus /metrics port", port),
    Option("--metrics-host", "metrics_host", "address of the metrics port (default: --host)", optional_text),
    Option(
        "--health-port",
        "health_port",
        "also serve grpc.health.v1 alone, in plaintext, on this port (for probes when gRPC uses TLS)",
        port,
    ),
    Option("--models", "models", "comma-separated models to serve", model_list),
    Option(
        "--weights",
        "weights",
        "'pretrained' (torchvision's, cached under TORCH_HOME), 'random' (seeded, for tests), "
        "or a directory of MODEL.pth state dicts",
    ),
    Option("--device", "device", "'auto', 'cpu', 'cuda' or a list such as cuda:0,cuda:1"),
    Option(
        "--dtype",
        "dtype",
        "what the networks compute in: float32 (exact), bfloat16 (CPUs with avx512_bf16 or amx_bf16, and GPUs "
        "that have it; runtimes torch and openvino) or float16 (GPUs); a default and model=precision exceptions, "
        "e.g. float32,resnet101=bfloat16. A precision the device does not compute natively is refused at start",
        dtype_choice,
    ),
    Option(
        "--min-precision-agreement",
        "min_precision_agreement",
        "lowest cosine of a model's logits in a reduced --dtype against float32 (over sample images, measured at "
        "load) for it to be served; under it the model is refused with the figures (0: never refuse)",
        fraction,
    ),
    Option("--channels-last", "channels_last", "NHWC memory format", boolean=True),
    Option(
        "--runtime",
        "runtime.name",
        "what runs the networks: auto (ONNX Runtime on CPUs, PyTorch on CUDA), torch, onnxruntime, "
        "openvino, or fastest (time each installed runtime at load, keep the fastest)",
        choices=RUNTIME_CHOICES,
    ),
    Option(
        "--runtime-cache",
        "runtime.cache_dir",
        "directory of networks exported for onnxruntime/openvino (shareable; rebuilt when missing or corrupt; "
        "an export no server uses is deleted an hour after its last use)",
        Path,
        environ_default=default_cache_dir,
        documented_default="`$XDG_CACHE_HOME/vision-serving/runtimes` (`~/.cache/...`)",
    ),
    Option(
        "--runtime-threads",
        "runtime.threads",
        "intra-op threads of the runtime per forward pass (0: one per usable core, divided among --instances)",
        non_negative_int,
    ),
    Option(
        "--instances",
        "runtime.instances",
        "model instances per device (Triton's instance_group count), each running its own batches at the same "
        "time as the others; more than 1 trades latency at low concurrency for throughput at high",
        instance_count,
    ),
    Option(
        "--runtime-spin",
        "runtime.spin",
        "when ONNX Runtime's intra-op threads busy-wait for work: during a forward pass only (run), "
        "also between passes (always: the runtime's own default), or never (they sleep)",
        choices=SPIN_CHOICES,
    ),
    Option("--max-batch-size", "batching.max_batch_size", "images per forward pass", positive_int),
    Option(
        "--max-queue-delay-ms", "batching.max_queue_delay_ms", "longest wait for a batch to fill", non_negative_float
    ),
    Option(
        "--max-rejoin-ms",
        "batching.max_rejoin_ms",
        "after a batch, longest wait for the clients it answered to send again and for admitted requests "
        "still decoding (also at most a quarter of the last forward pass; 0: off)",
        non_negative_float,
    ),
    Option(
        "--max-queue-size",
        "batching.max_queue_size",
        "images queued per model before RESOURCE_EXHAUSTED",
        positive_int,
    ),
    Option("--decode-threads", "decode_threads", "image decoding threads (0: one per usable core)", int),
    Option(
        "--frontends",
        "frontends",
        "protocol processes sharing the gRPC and HTTP ports in front of one engine process that owns the models "
        "('auto': 1 below 8 usable cores, where the protocol runs in the engine's own process, else a quarter "
        "of the cores, at most 8); 1 runs everything in one process",
        frontend_count,
    ),
    Option("--max-image-pixels", "max_image_pixels", "largest decoded image (w*h)", positive_int),
    Option(
        "--max-request-images",
        "max_request_images",
        "images one request may carry, checked before any is decoded (default: --max-queue-size)",
        positive_int,
    ),
    Option(
        "--max-stream-in-flight",
        "max_stream_in_flight",
        "requests of one ModelStreamInfer stream worked on at once; the stream is not read further meanwhile",
        positive_int,
    ),
    Option("--max-message-bytes", "max_message_bytes", "largest gRPC message", positive_int),
    Option(
        "--max-shared-memory-regions",
        "max_shared_memory_regions",
        "system shared memory regions registered at once (Triton's extension; 0: off); "
        "registering is a management call from this host only",
        non_negative_int,
    ),
    Option(
        "--max-shared-memory-bytes",
        "max_shared_memory_bytes",
        "bytes of all system shared memory regions together (an input read from one is bounded by --max-message-bytes)",
        positive_int,
    ),
    Option(
        "--model-store",
        "model_store",
        "where fine-tuned models and job records live, shared by replicas: a directory, or s3://bucket/prefix "
        "(credentials from the standard AWS chain; AWS_ENDPOINT_URL for S3-compatible servers); "
        "'none' turns fine-tuning off",
        store_location,
        environ_default=default_store_dir,
        documented_default="`$XDG_DATA_HOME/vision-serving/models` (`~/.local/share/...`)",
    ),
    Option(
        "--store-poll-seconds",
        "store_poll_seconds",
        "how often to look for models other replicas wrote to the store",
        positive_float,
    ),
    _limit("--max-finished-jobs", "max_finished_jobs", "finished fine-tuning job records kept in the model store"),
    Option(
        "--max-kept-job-bytes",
        "fine_tuning.max_kept_job_bytes",
        "bytes of running jobs' kept features and checkpoints in the model store, all jobs together, so that "
        "a job goes on after a restart (a job beyond it runs without; 0: no job survives a restart)",
        non_negative_int,
    ),
    Option(
        "--job-lease-seconds",
        "fine_tuning.job_lease_s",
        "how long a running job stays its server's after the server last renewed its lease: a job whose "
        "server died goes on at another replica (or the next start) after this",
        positive_float,
    ),
    Option(
        "--job-checkpoint-seconds",
        "fine_tuning.job_checkpoint_s",
        "least time between two checkpoints of a running job (0: after every epoch; the last epoch's is always "
        "written): fewer writes of a large head, more epochs run again after a restart",
        non_negative_float,
    ),
    Option(
        "--keep-versions",
        "fine_tuning.keep_versions",
        "versions of each fine-tuned model kept in the model store (each publish of a name makes one; the "
        "oldest beyond these are collected): those a request's model_version and RollbackModel may name",
        keep_count,
    ),
    Option(
        "--dataset-roots",
        "fine_tuning.dataset_roots",
        "comma-separated directories and s3://bucket/prefix URLs under which a fine-tuning job may name its "
        "images (FineTuneConfig.dataset) instead of uploading them; S3 with the model store's credentials "
        "(the AWS chain); none: datasets are refused",
        dataset_roots,
        documented_default="none",
    ),
    _limit("--max-queued-jobs", "max_queued_jobs", "fine-tuning jobs queued or running before RESOURCE_EXHAUSTED"),
    _limit(
        "--max-job-uploads", "max_uploads", "CreateJob streams receiving examples at once before RESOURCE_EXHAUSTED"
    ),
    _limit(
        "--max-job-uploads-per-peer",
        "max_uploads_per_peer",
        "of --max-job-uploads, those one client address may hold at once before RESOURCE_EXHAUSTED",
    ),
    Option(
        "--upload-idle-seconds",
        "fine_tuning.upload_idle_s",
        "longest wait for the next message, part or chunk of a job's upload before DEADLINE_EXCEEDED",
        positive_float,
    ),
    Option(
        "--max-upload-seconds",
        "fine_tuning.max_upload_s",
        "longest upload of one job's config and examples before DEADLINE_EXCEEDED",
        positive_float,
    ),
    _limit(
        "--max-job-watchers", "max_watchers_per_job", "WatchJob streams following one job before RESOURCE_EXHAUSTED"
    ),
    _limit(
        "--max-watchers", "max_watchers", "WatchJob streams open at once, all jobs together, before RESOURCE_EXHAUSTED"
    ),
    _limit("--max-job-examples", "max_examples", "examples per fine-tuning job"),
    _limit("--max-job-bytes", "max_total_bytes", "bytes of one job's images, labels and targets together"),
    _limit("--max-head-parameters", "max_head_parameters", "trainable parameters of a fine-tuned head"),
    _limit("--max-labels", "max_labels", "classes of one fine-tuning job"),
    _limit("--max-label-length", "max_label_length", "UTF-8 bytes of one class name"),
    Option(
        "--auth-token-file",
        "auth_token_file",
        "bearer tokens, one a line, re-read when the file changes; management RPCs need one "
        "(without this file they are accepted from loopback only)",
        Path,
    ),
    Option(
        "--auth-scope",
        "auth_scope",
        "what the tokens protect: 'management' RPCs, or 'all' RPCs (health stays open)",
        choices=AUTH_SCOPES,
    ),
    Option(
        "--allowed-hosts",
        "allowed_hosts",
        "comma-separated names of this host that HTTP requests from it may carry in Host ('*': any); "
        "IP addresses, localhost and names without a dot always count (see docs/security.md)",
        host_list,
        documented_default="none",
    ),
    Option("--tls-cert-file", "tls_cert_file", "PEM certificate chain: the gRPC port speaks TLS", Path),
    Option("--tls-key-file", "tls_key_file", "PEM private key of --tls-cert-file", Path),
    Option(
        "--tls-client-ca-file",
        "tls_client_ca_file",
        "PEM CA bundle: mutual TLS, clients need a certificate it signed",
        Path,
    ),
    Option("--drain-seconds", "drain_seconds", "grace for in-flight work on SIGTERM", non_negative_float),
    Option("--log-level", "log_level", "log level", choices=LOG_LEVELS),
    Option(
        "--log-format",
        "log_format",
        "log lines as text, or as one JSON object a line; lines about a request carry its request and trace ids",
        choices=LOG_FORMATS,
    ),
    Option(
        "--access-log",
        "access_log",
        "log one line per inference request (logger vision.access): method, model, version, status, duration, "
        "bytes; never payloads or tokens",
        boolean=True,
    ),
    Option(
        "--trace",
        "trace",
        "export OpenTelemetry traces of every request over OTLP, as the standard OTEL_* variables say "
        "(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_TRACES_SAMPLER, OTEL_SERVICE_NAME; "
        "docs/operations.md)",
        boolean=True,
    ),
)


def _shown(value: object) -> object:
    """A default as a person (and argparse, which parses string defaults) writes it."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, Path):
        return str(value)
    return value


# -- the parser and the config ----------------------------------------------------------------


def build_serve_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """``vision-serve``'s parser; a ``VISION_SERVE_<OPTION>`` variable in ``environ`` is an option's
    default (a flag wins)."""
    parser = argparse.ArgumentParser(
        prog="vision-serve",
        description="Serve torchvision classifiers over gRPC (Open Inference Protocol). "
        "`vision-serve fetch-weights --help` pre-downloads pretrained weights.",
    )
    for option in OPTIONS:
        default: object = _shown(option.default(environ))
        if option.env in environ:
            default = environ[option.env]
            if option.boolean:
                default = str(default).strip().lower() in _TRUE
        kwargs: dict[str, Any] = {"default": default, "help": f"{option.help} [env {option.env}; default: %(default)s]"}
        if option.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        if option.type is not None:
            kwargs["type"] = option.type
        if option.choices is not None:
            kwargs["choices"] = option.choices
        parser.add_argument(option.flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The typed config of parsed options, checked where options depend on each other."""
    for option in OPTIONS:
        # argparse checks choices on the command line only, not on defaults taken from the environment.
        value = getattr(args, option.dest)
        if option.choices is not None and value not in option.choices:
            raise SystemExit(f"vision-serve: error: {option.flag} {value!r}: choose one of {', '.join(option.choices)}")
    if args.health_port and args.health_port in (args.grpc_port, args.metrics_port, args.http_port):
        raise SystemExit(
            "vision-serve: error: --health-port must differ from --grpc-port, --http-port and --metrics-port"
        )
    if args.http_port and args.http_port in (args.grpc_port, args.metrics_port):
        raise SystemExit("vision-serve: error: --http-port must differ from --grpc-port and --metrics-port")
    if args.max_queue_size < args.max_batch_size:
        raise SystemExit("vision-serve: error: --max-queue-size must be at least --max-batch-size")
    if args.max_request_images is not None and args.max_request_images > args.max_queue_size:
        raise SystemExit(
            "vision-serve: error: --max-request-images must not exceed --max-queue-size "
            "(a larger request could never be queued)"
        )
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for option in OPTIONS:
        section, _, name = option.field.rpartition(".")
        (sections[section] if section else top)[name] = getattr(args, option.dest)
    for section, kind in SECTIONS.items():
        top[section] = kind(**sections[section])
    return ServeConfig(**top)


# -- the docs ---------------------------------------------------------------------------------


def markdown() -> str:
    """docs/configuration.md: every option, its variable, default and meaning."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m service.options > docs/configuration.md` from service/options.py;",
        "     tests/test_options.py fails when this file differs. -->",
        "",
        "`vision-serve` takes each option as a flag or as an environment variable; a flag wins over",
        "the variable. Boolean options take `--name` / `--no-name`, or `1`, `true`, `yes`, `on` in the",
        "variable. `vision-serve fetch-weights [--models ...]` downloads pretrained weights ahead of",
        "time ([operations.md](operations.md)).",
        "",
        "| option | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for option in OPTIONS:
        if option.documented_default is not None:
            default = option.documented_default
        else:
            value = _shown(option.default({}))
            default = "(none)" if value is None else f"`{value}`"
        meaning = option.help.replace("|", "\\|")
        if option.choices is not None:
            meaning += f" (one of {', '.join(f'`{choice}`' for choice in option.choices)})"
        lines.append(f"| `{option.flag}` | `{option.env}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def _settable_fields() -> list[str]:
    """Every field path of ServeConfig (for the tests: which of them are options)."""
    paths = []
    for field in dataclasses.fields(ServeConfig):
        if field.name in SECTIONS:
            paths += [f"{field.name}.{inner.name}" for inner in dataclasses.fields(SECTIONS[field.name])]
        else:
            paths.append(field.name)
    return paths


if __name__ == "__main__":
    print(markdown(), end="")
