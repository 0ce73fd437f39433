"""Building served models: networks with their weights, placed on the devices in the chosen
runtime (``--runtime``), behind a queue and worker threads that are warmed up before use.

:class:`ModelFactory` makes things and forgets them; :class:`service.engine.repository.ModelRepository`
keeps them by name. Derived models (a built-in model's features for fine-tuning, fine-tuned
heads) are built from a built-in model's instances and share its weights.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from functools import partial
from pathlib import Path

import torch

from service.config import FASTEST, FLOAT32, TORCH, ServeConfig
from service.engine.batching import BatchQueue, min_split_images
from service.engine.devices import resolve_dtype
from service.engine.metrics import ServerMetrics
from service.engine.precision import Agreement, Precision, check_floor, measure, reference_logits, sample_batch, worst
from service.engine.runtime import InferenceWorker, ModelInstance
from service.engine.served import BUILTIN_PLATFORM, FEATURES_SUFFIX, FINETUNED_PLATFORM, ServedModel
from service.errors import FailedPreconditionError, quote
from service.host.cpus import usable_cores, use_torch_threads
from service.inference.preprocess import ImageDecoder
from service.models import ModelSpec, WeightsSource, build_model, get_model_spec
from service.models.preprocessing import preprocessing_of
from service.runtimes.base import FEATURES, Backend
from service.runtimes.export import Collected, ExportCache, ExportLeases, default_cache_dir
from service.runtimes.select import BackendLoader, RuntimeOptions, candidates, time_backend
from service.runtimes.torch_backend import TorchBackend

ACTIVATIONS_SUFFIX = ":activations"  # a fine-tuning job's internal model of a backbone's frozen prefix

log = logging.getLogger(__name__)


class ModelFactory:
    def __init__(self, config: ServeConfig, devices: list[torch.device], metrics: ServerMetrics) -> None:
        self._config = config
        self._devices = devices
        self._metrics = metrics
        self._weights: dict[str, WeightsSource] = {}  # each built-in model's, once it is built
        runtime = config.runtime
        self._options = RuntimeOptions(
            runtime=runtime.name,
            cache_dir=runtime.cache_dir or default_cache_dir(),
            threads=runtime.instance_threads,
            lone_threads=runtime.lone_threads,
            spin=runtime.spin,
            channels_last=config.channels_last,
        )
        self._leases = ExportLeases()  # on the runtime cache's entries of the models built, while served
        self._builds = 0  # networks being built now (their entries are not yet any model's)
        self._builds_lock = threading.Lock()
        # Every runtime, device and precision must be usable before anything is built: fail at start-up, clearly.
        for device in devices:
            candidates(runtime.name, device)
            for model in dict.fromkeys((*config.models, *(name for name, _ in config.dtype.models))):
                self._precision_on(model, device)

    @property
    def devices(self) -> list[torch.device]:
        return list(self._devices)

    # -- served models, not yet running ---------------------------------------

    def declare_builtin(self, name: str) -> ServedModel:
        """A built-in model, LOADING: known (listed, health NOT_SERVING) before it is built."""
        spec = get_model_spec(name)
        model = self._new_served(name, spec, spec.categories, spec.num_classes, platform=BUILTIN_PLATFORM)
        model.precision = Precision(self._config.dtype.for_model(name))  # its agreement once measured
        return model

    # -- building and starting ------------------------------------------------

    async def start_builtin(self, model: ServedModel, weights: WeightsSource) -> None:
        """Build built-in ``model``'s network from ``weights`` on every device and start its
        workers, warmed up. The torch copy of the weights is dropped when the runtime does not
        need it."""
        spec = get_model_spec(model.name)
        self._weights[model.name] = weights
        instances, precision, exports = await asyncio.to_thread(self.build_instances, spec, weights)
        model.precision = precision
        model.exports = exports
        self._metrics.set_precision_agreement(model.name, precision.dtype, precision.agreement)
        await asyncio.to_thread(self._start_workers, model, instances)

    def build_instances(
        self, spec: ModelSpec, weights: WeightsSource
    ) -> tuple[list[ModelInstance], Precision, tuple[Path, ...]]:
        """``spec``'s network with ``weights``, ``--instances`` instances per device, in its ``--dtype``,
        that precision's agreement with float32 where it is reduced, and the runtime cache's entries
        they run from, leased (blocking: seconds). FailedPreconditionError where the agreement is
        under ``--min-precision-agreement``."""
        use_torch_threads(usable_cores())  # building, exporting, timing, measuring: this thread's own count
        return self._build_instances(spec, build_model(spec, weights), spec.name)

    def _build_instances(
        self, spec: ModelSpec, net: torch.nn.Module, dtype_of: str
    ) -> tuple[list[ModelInstance], Precision, tuple[Path, ...]]:
        """:meth:`build_instances` of network ``net``, in the ``--dtype`` of model ``dtype_of``."""
        with self._builds_lock:
            self._builds += 1
        try:
            loader = BackendLoader(spec, net, self._options)
            instances, precision = self._build_with(loader, spec, net, dtype_of)
            exports = () if loader.export_entry is None else (loader.export_entry,)
            self._leases.hold(exports)
            return instances, precision, exports
        finally:
            with self._builds_lock:
                self._builds -= 1

    def _build_with(
        self, loader: BackendLoader, spec: ModelSpec, net: torch.nn.Module, dtype_of: str
    ) -> tuple[list[ModelInstance], Precision]:
        count = self._config.runtime.instances
        precision = self._config.dtype.for_model(dtype_of)
        asked = self._config.dtype.option_text(dtype_of)
        # Measured before any backend is built: a torch backend on the CPU in float32 is this very network.
        batch = reference = None
        if precision != FLOAT32:
            batch = sample_batch(spec)
            reference = reference_logits(spec, net, batch)
        agreement: Agreement | None = None
        instances: list[ModelInstance] = []
        for device in self._devices:
            dtype = self._precision_on(dtype_of, device)
            names = candidates(self._options.runtime, device, precision, asked=asked)
            if self._options.runtime == FASTEST and len(names) > 1:
                backend = self._fastest(spec, loader, names, device, dtype)
            else:
                backend = loader.load(names[0], device, dtype)
            if batch is not None and reference is not None:
                measured = measure(backend, batch, reference)
                log.info("%s in %s on %s (%s): %s", spec.name, precision, device, backend.runtime, measured.describe())
                check_floor(spec.name, asked, measured, self._config.min_precision_agreement)
                agreement = measured if agreement is None else worst(agreement, measured)
            lone = loader.lone_backend(backend)
            instances += [ModelInstance(b, lone=lone) for b in loader.instances_of(backend, count)]
        log.info(
            "%s runs on %s in %s%s%s",
            spec.name,
            ", ".join(dict.fromkeys(f"{i.runtime} ({i.label})" for i in instances)),
            precision,
            f", {count} instances each" if count > 1 else "",
            self._cpu_threads(instances) if any(i.device.type == "cpu" for i in instances) else "",
        )
        return instances, Precision(precision, agreement)

    def _precision_on(self, model: str, device: torch.device) -> torch.dtype:
        """``model``'s ``--dtype`` on ``device``, refused where the device (or every runtime) lacks it."""
        precision = self._config.dtype.for_model(model)
        asked = self._config.dtype.option_text(model)
        dtype = resolve_dtype(precision, device, asked=asked)
        candidates(self._options.runtime, device, precision, asked=asked)
        return dtype

    def _cpu_threads(self, instances: list[ModelInstance]) -> str:
        """What a forward pass on the CPU gets, for the log: its threads, and a lone batch's."""
        lone = self._options.lone_threads if any(i.lone is not None for i in instances) else None
        return f"; CPU threads per forward pass: {self._options.threads}" + (
            f", {lone} for a batch that runs alone" if lone is not None else ""
        )

    def start_features(self, base: ServedModel) -> ServedModel:
        """The internal feature extractor of built-in ``base``, running (blocking: starts threads)."""
        spec = get_model_spec(base.name)
        labels = [f"feature_{i}" for i in range(spec.feature_dim)]
        model = self._new_served(base.name + FEATURES_SUFFIX, spec, labels, spec.feature_dim, platform=BUILTIN_PLATFORM)
        model.base_model = base.name
        model.precision = Precision(base.precision.dtype)
        self._start_workers(model, [i.features() for i in base.instances], warm_up=False)
        return model

    def base_network(self, name: str) -> torch.nn.Module:
        """A new float32 CPU copy of built-in ``name``'s network, with the weights it is served with
        (blocking: seconds); for fine-tuning jobs that train its last blocks, and their models."""
        weights = self._weights.get(name)
        if weights is None:
            raise FailedPreconditionError(f"{quote(name)} has not been loaded; load it first")
        return build_model(get_model_spec(name), weights)

    def start_activations(self, base: ServedModel, prefix: torch.nn.Module) -> ServedModel:
        """An internal model of built-in ``base``'s input preprocessing whose output is ``prefix``'s
        (a backbone's frozen first part, float32, eager torch: the activations a job keeps), on
        every device, running (blocking: starts threads). Its queue's owner closes it when done."""
        spec = get_model_spec(base.name)
        model = self._new_served(base.name + ACTIVATIONS_SUFFIX, spec, [], 0, platform=BUILTIN_PLATFORM)
        model.base_model = base.name
        instances = []
        for device in self._devices:
            module = prefix.eval() if device.type == "cpu" else copy.deepcopy(prefix).to(device).eval()
            backend = TorchBackend(module, torch.nn.Identity(), device, threads=self._options.threads or None)
            instances.append(ModelInstance(backend, output=FEATURES))
        self._start_workers(model, instances, warm_up=False)
        return model

    def start_network(
        self, name: str, base: ServedModel, spec: ModelSpec, net: torch.nn.Module, labels: list[str], version: str
    ) -> ServedModel:
        """A fine-tuned whole network ``net`` (``spec`` says how it splits into features and
        classifier) served as ``name`` in the runtime and ``--dtype`` of its base, exported as a
        built-in model is (the runtime cache keyed by its weights); blocking: export, warm-up."""
        use_torch_threads(usable_cores())
        instances, precision, exports = self._build_instances(spec, net, base.name)
        model = self._new_served(name, spec, labels, len(labels), platform=FINETUNED_PLATFORM)
        model.base_model = base.name
        model.version = version
        model.precision = precision
        model.exports = exports
        self._start_workers(model, instances)
        return model

    def start_finetuned(
        self, name: str, base: ServedModel, head: torch.nn.Module, labels: list[str], version: str
    ) -> ServedModel:
        """``head`` on ``base``'s features, served as ``name`` (blocking: warm-up forward passes)."""
        spec = get_model_spec(base.name)
        model = self._new_served(name, spec, labels, len(labels), platform=FINETUNED_PLATFORM)
        model.base_model = base.name
        model.version = version
        model.precision = Precision(base.precision.dtype)  # its base's backbone; the head's agreement is not measured
        self._start_workers(model, [i.with_head(head) for i in base.instances])
        return model

    # -- the runtime cache -----------------------------------------------------

    def collect_exports(self, models: list[ServedModel]) -> Collected | None:
        """Lease the runtime cache's entries of ``models`` (all this server serves) alone, and delete
        the entries no server uses (:meth:`ExportCache.collect`); None when nothing was looked at
        (this server exports nothing, or a build is choosing its entry right now). Blocking."""
        if self._options.runtime == TORCH:
            return None
        with self._builds_lock:
            if self._builds:
                return None  # the next pass collects; this one could take the entry a build is about to use
        entries = {entry for model in models for entry in model.exports}
        self._leases.keep_only(entries)
        return ExportCache(self._options.cache_dir).collect(held=entries)

    def close(self) -> None:
        """Release the leases on the runtime cache (the server has stopped)."""
        self._leases.close()

    # -- internals -------------------------------------------------------------

    def _fastest(
        self, spec: ModelSpec, loader: BackendLoader, names: list[str], device: torch.device, dtype: torch.dtype
    ) -> Backend:
        timings = {}
        backends = {}
        for name in names:
            backend = loader.load(name, device, dtype)
            timings[name] = time_backend(backend, spec.crop_size)
            backends[name] = backend
        best = min(timings, key=timings.__getitem__)
        log.info(
            "--runtime fastest: %s on %s, ms per image: %s; keeping %s",
            spec.name,
            device,
            ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in timings.items()),
            best,
        )
        return backends[best]

    def _new_served(
        self, name: str, spec: ModelSpec, labels: list[str], num_outputs: int, *, platform: str
    ) -> ServedModel:
        return ServedModel(
            name=name,
            labels=labels,
            num_outputs=num_outputs,
            input_size=spec.crop_size,
            min_size=spec.min_size,
            platform=platform,
            decoder=ImageDecoder(preprocessing_of(spec.transforms()), max_pixels=self._config.max_image_pixels),
            queue=BatchQueue(
                capacity_images=self._config.batching.max_queue_size,
                on_depth_change=self._metrics.queue_depth_recorder(name),
            ),
        )

    @staticmethod
    def _min_split_images(model: ServedModel, instances: list[ModelInstance]) -> int:
        """Fewest images per instance when work is split: where every instance has a lone-batch
        backend on every core (they divided a CPU's cores), a network that reads much weight for
        little work (AlexNet) keeps small loads in one batch, which runs there
        (service.engine.batching.min_split_images); elsewhere any split."""
        if not instances or any(instance.lone is None for instance in instances):
            return 1
        spec = get_model_spec(model.base_model or model.name)
        return min_split_images(spec.multiply_adds_per_weight_byte)

    def _start_workers(self, model: ServedModel, instances: list[ModelInstance], *, warm_up: bool = True) -> None:
        batching = self._config.batching
        per_device = self._config.runtime.instances
        model.queue.set_min_split_images(self._min_split_images(model, instances))
        for index, instance in enumerate(instances):
            worker = InferenceWorker(
                model.name,
                model.queue,
                instance,
                max_batch_size=batching.max_batch_size,
                max_delay_s=batching.max_queue_delay_s,
                max_rejoin_s=batching.max_rejoin_s,
                on_batch=partial(self._metrics.record_batch, model.name, version=model.version),
                warm_up_shape=(3, model.input_size, model.input_size) if warm_up else None,
                suffix=f"-{index % per_device}" if per_device > 1 else "",
                torch_threads=self._options.threads,
            )
            worker.start()
            model.workers.append(worker)
