"""The server's configuration, built once in ``main()`` and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.host.cpus import usable_cores
from service.storage.location import StoreLocation

DEFAULT_MODELS: tuple[str, ...] = ("alexnet", "vgg16", "resnet101")
# What --auth-token-file protects: "management" RPCs only, or "all" (inference too; health never).
AUTH_SCOPES: tuple[str, ...] = ("management", "all")
# What a network may compute in (--dtype): float32 is exact; the others where the device has them natively.
FLOAT32 = "float32"
PRECISIONS: tuple[str, ...] = (FLOAT32, "bfloat16", "float16")


TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES: tuple[str, ...] = (TORCH, ONNXRUNTIME, OPENVINO)
# What --runtime accepts: a runtime, or a rule that picks one per model and device kind.
AUTO = "auto"
FASTEST = "fastest"
RUNTIME_CHOICES: tuple[str, ...] = (AUTO, *RUNTIMES, FASTEST)

# When ONNX Runtime's intra-op threads busy-wait for their next piece of work: during a forward pass
# only (the server's default), also between passes (the runtime's own default), or never.
SPIN_RUN = "run"
SPIN_ALWAYS = "always"
SPIN_NEVER = "never"
SPIN_CHOICES: tuple[str, ...] = (SPIN_RUN, SPIN_ALWAYS, SPIN_NEVER)


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/vision-serving/runtimes``, or ``~/.cache/vision-serving/runtimes``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "vision-serving" / "runtimes"


FRONTENDS_FROM_CORES = 8  # usable cores from which --frontends auto runs front ends of their own


@dataclass(frozen=True)
class DtypeChoice:
    """``--dtype``: the precision of every model, and per-model exceptions.

    Written ``float32`` (every model), ``bfloat16``, or a default and ``model=precision`` pairs in any
    order: ``float32,resnet101=bfloat16``. :meth:`parse` is the one reader of that text.
    """

    default: str = FLOAT32
    models: tuple[tuple[str, str], ...] = ()  # (model, precision), in the order given

    def for_model(self, name: str) -> str:
        """The precision ``name`` computes in."""
        return dict(self.models).get(name, self.default)

    def option_text(self, name: str) -> str:
        """How ``--dtype`` asked for ``name``'s precision, for messages: ``bfloat16`` or ``resnet101=bfloat16``."""
        chosen = dict(self.models).get(name)
        return self.default if chosen is None else f"{name}={chosen}"

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision it names."""
        return tuple(dict.fromkeys((self.default, *(precision for _, precision in self.models))))

    def __str__(self) -> str:
        return ",".join((self.default, *(f"{model}={precision}" for model, precision in self.models)))

    @classmethod
    def parse(cls, text: str) -> DtypeChoice:
        """``text`` as written on the command line; ValueError saying what is wrong otherwise."""
        choices = ", ".join(PRECISIONS)
        default: str | None = None
        models: dict[str, str] = {}
        items = [item.strip() for item in text.split(",")]
        if not any(items):
            raise ValueError(f"name a precision ({choices}), optionally with model=precision pairs")
        for item in items:
            model, equals, precision = item.rpartition("=")
            model, precision = model.strip(), precision.strip().lower()
            if not item:
                raise ValueError(f"{text!r} has an empty item; separate items with single commas")
            if precision not in PRECISIONS:
                raise ValueError(f"{precision or item!r} in {item!r} is not a precision; choose one of {choices}")
            if not equals:
                if default is not None:
                    raise ValueError(
                        f"{text!r} names two default precisions ({default}, {precision}); "
                        "give one, and model=precision for the exceptions"
                    )
                default = precision
            elif not model or "=" in model:
                raise ValueError(f"{item!r}: write model=precision, e.g. resnet101=bfloat16")
            elif model in models:
                raise ValueError(f"{text!r} names {model} twice")
            else:
                models[model] = precision
        return cls(default or FLOAT32, tuple(models.items()))


@dataclass(frozen=True)
class BatchingConfig:
    """How each model's queue turns requests into batches."""

    max_batch_size: int = 32
    # 0, as Triton: a free worker takes whatever is queued. Measured (bench/README.md): +14-25%
    # images/s at one client against 5 ms, no loss at 8 and 32, where batches fill while one runs.
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 512  # images waiting per model before RESOURCE_EXHAUSTED
    # After a batch, how long a worker may wait for the clients it answered to send again and for
    # admitted requests still decoding (also at most a quarter of the last forward pass; 0: never):
    # without it, closed-loop clients split into two half-size batches (service.engine.batching).
    max_rejoin_ms: float = 50.0

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def max_rejoin_s(self) -> float:
        return self.max_rejoin_ms / 1000.0


@dataclass(frozen=True)
class FineTuneLimits:
    """What fine-tuning may ask of a server: per job, and jobs at once."""

    max_examples: int = 20_000  # examples per job
    max_total_bytes: int = 512 * 1024 * 1024  # a job's image, label and target bytes together
    max_epochs: int = 1_000
    max_hidden: int = 8_192
    max_blocks: int = 8
    max_batch_size: int = 4_096
    max_target_size: int = 1_024  # values per regression target
    max_head_parameters: int = 50_000_000  # trainable parameters of a head (200 MB of float32)
    max_label_length: int = 128  # UTF-8 bytes of one class name
    max_labels: int = 4_096  # distinct classes of one job
    max_uploads: int = 4  # CreateJob streams receiving examples at once
    max_uploads_per_peer: int = 2  # of those, from one client address
    upload_idle_s: float = 30.0  # longest wait for the next piece of an upload (a message, a part, a chunk)
    max_upload_s: float = 600.0  # longest upload of one job, from its first message to its last
    max_watchers_per_job: int = 8  # WatchJob streams (gRPC or Server-Sent Events) following one job
    max_watchers: int = 64  # WatchJob streams open at once, all jobs together
    max_queued_jobs: int = 8  # jobs queued or running (each holds its examples until features are extracted)
    max_finished_jobs: int = 100  # finished job records kept in the store
    # Jobs that survive a restart (service.finetune.durable): bytes of running jobs' kept inputs and
    # checkpoints in the store, all jobs together (0: no job is kept); how long a job's lease holds
    # after its server last renewed it (a server that dies leaves its jobs to others after this).
    max_kept_job_bytes: int = 4 * 1024**3
    job_lease_s: float = 30.0
    job_checkpoint_s: float = 0.0  # least time between two checkpoints of a job (0: after every epoch)
    # Versions of each fine-tuned model kept in the store (each publish of a name makes one; the oldest
    # beyond these are collected): what a request's model_version and a rollback may name.
    keep_versions: int = 3
    # Where a job may name its images instead of uploading them (directories and s3://bucket/prefix);
    # none: datasets are refused (service.finetune.datasets).
    dataset_roots: tuple[StoreLocation, ...] = ()


@dataclass(frozen=True)
class RuntimeConfig:
    """Which runtime runs the networks, where exported networks are cached, and its threads."""

    name: str = "auto"  # auto, torch, onnxruntime, openvino, fastest (service.runtimes.base)
    cache_dir: Path | None = None  # None: $XDG_CACHE_HOME/vision-serving/runtimes
    threads: int = 0  # intra-op threads of each instance's runtime; 0: the usable cores, shared out among the instances
    # Model instances per device (Triton's instance_group count): each has a worker taking batches from
    # the model's queue, so that several batches run at once (service.engine.batching shares the work out).
    instances: int = 1
    # When ONNX Runtime's intra-op threads busy-wait for work (service.runtimes.base.SPIN_CHOICES):
    # during a forward pass only, so that between batches the cores decode images and run the protocol.
    spin: str = "run"

    @property
    def instance_threads(self) -> int:
        """Intra-op threads each instance's runtime gets: ``threads``, else the cores this process
        may use (:func:`service.host.cpus.usable_cores`) divided among the instances, so that instances
        running at once do not oversubscribe them."""
        return self.threads or max(1, usable_cores() // self.instances)

    @property
    def lone_threads(self) -> int | None:
        """Intra-op threads of a batch that runs while no other instance computes: every usable core
        where the instances divided them among them and that is more than each got, else None (no
        batch is special)."""
        if self.threads or self.instances == 1:
            return None
        cores = usable_cores()
        return cores if cores > self.instance_threads else None


@dataclass(frozen=True)
class ServeConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int | None = 8000  # the REST binding (KServe v2 and Triton's extensions); None: off
    metrics_port: int = 8002
    models: tuple[str, ...] = DEFAULT_MODELS
    weights: str = "pretrained"  # "pretrained", "random" or a directory of <model>.pth
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:0,cuda:1"
    dtype: DtypeChoice = field(default_factory=DtypeChoice)  # what each model computes in (PRECISIONS)
    # Lowest cosine of a model's logits in a reduced precision against float32, over the sample images
    # measured at load (service.engine.precision), under which the model is not served in that precision.
    min_precision_agreement: float = 0.99
    channels_last: bool = False
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    decode_threads: int = 0  # 0: one per CPU core
    frontends: int = 0  # protocol processes; 0: auto (frontend_count)
    max_image_pixels: int = 40_000_000  # decoded width*height cap (decompression bombs)
    max_request_images: int | None = None  # images in one request; None: the queue size
    max_stream_in_flight: int = 64  # requests of one ModelStreamInfer call being worked on at once (>= a batch)
    max_message_bytes: int = 64 * 1024 * 1024
    # Triton's system shared memory: regions registered at once (0: the extension is off), and their
    # bytes together. Inputs read from a region are bounded by max_message_bytes, as in a message.
    max_shared_memory_regions: int = 128
    max_shared_memory_bytes: int = 1024 * 1024 * 1024
    # A call's first request message must arrive within this of its start (service.transport.requests);
    # a 64 MB request needs about 17 Mbit/s.
    first_message_timeout_s: float = 30.0
    model_store: StoreLocation | None = None  # a directory or s3://bucket/prefix; None: fine-tuning is off
    store_poll_seconds: float = 5.0
    fine_tuning: FineTuneLimits = field(default_factory=FineTuneLimits)
    auth_token_file: Path | None = None  # one token a line, re-read when it changes
    auth_scope: str = "management"  # one of AUTH_SCOPES
    # Names of this host that a loopback caller's HTTP Host may carry, besides IP literals and localhost
    # (DNS rebinding: see transport/auth.py); "*": any.
    allowed_hosts: tuple[str, ...] = ()
    tls_cert_file: Path | None = None  # PEM chain; with tls_key_file, the gRPC port speaks TLS only
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # mutual TLS: clients need a certificate this CA signed
    metrics_host: str | None = None  # None: the same address as host
    health_port: int | None = None  # a plaintext port serving grpc.health.v1 only (probes under TLS)
    drain_seconds: float = 25.0
    log_level: str = "INFO"
    log_format: str = "text"  # "text" or "json" (service.telemetry.logs)
    access_log: bool = False  # one line per inference request on logger vision.access
    trace: bool = False  # OpenTelemetry spans exported over OTLP, configured by the OTEL_* variables

    @property
    def frontend_count(self) -> int:
        """Protocol processes (``frontends``, else 1 below :data:`FRONTENDS_FROM_CORES` usable cores, where
        the hop between processes costs more than a second event loop gains, else a quarter of the cores,
        at most 8). 1: the protocol runs in the engine's own process, as one process."""
        if self.frontends:
            return self.frontends
        cores = usable_cores()
        return 1 if cores < FRONTENDS_FROM_CORES else min(8, cores // 4)

    @property
    def decode_thread_count(self) -> int:
        """Threads of the decode pool (``decode_threads``, else one per usable core)."""
        return self.decode_threads or usable_cores()

    @property
    def request_images_limit(self) -> int:
        """Most images one request may carry (``max_request_images``, else the queue size)."""
        return self.max_request_images or self.batching.max_queue_size
