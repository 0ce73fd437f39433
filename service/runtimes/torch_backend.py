"""Eager PyTorch: the reference runtime; ``--dtype`` by converted weights (bfloat16 on CPUs that
have it, float16 and bfloat16 on CUDA), and channels_last."""

from __future__ import annotations

import copy

import torch

from service.config import TORCH
from service.engine.devices import NAMES
from service.host.cpus import use_torch_threads
from service.models import ModelSpec
from service.runtimes.base import FEATURES, Output


class TorchBackend:
    """A network split into backbone features and its last layer, on one device and dtype.

    On a CPU, ``threads`` is how many intra-op threads a forward pass runs on (None: whatever the
    calling thread has). torch's count belongs to the calling thread, so backends that share one
    module may run on different counts: an instance's, and a lone batch's on every core.
    """

    runtime = TORCH

    def __init__(
        self,
        features: torch.nn.Module,
        classifier: torch.nn.Module,
        device: torch.device,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        threads: int | None = None,
    ) -> None:
        self.features = features.eval()
        self.classifier = classifier.eval()
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.threads = threads
        self._staging: dict[tuple[int, ...], torch.Tensor] = {}  # pinned host buffers, CUDA only

    @classmethod
    def place(
        cls,
        spec: ModelSpec,
        net: torch.nn.Module,
        device: torch.device,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        threads: int | None = None,
    ) -> TorchBackend:
        """Put ``net`` on ``device`` in ``dtype``: a copy, unless it stays as it is on the CPU (its
        float32 original is the reference that agreement is measured against, and what is exported)."""
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        if device.type != "cpu" or dtype != torch.float32:
            net = copy.deepcopy(net)
        net = net.to(device=device, dtype=dtype).to(memory_format=memory_format).eval()
        return cls(
            spec.features(net), spec.classifier(net), device, dtype=dtype, channels_last=channels_last, threads=threads
        )

    @property
    def precision(self) -> str:
        return NAMES[self.dtype]

    def share(self) -> TorchBackend:
        return self.on_threads(self.threads)

    def on_threads(self, threads: int | None) -> TorchBackend:
        """Another handle on the same module whose forward passes run on ``threads``."""
        return TorchBackend(
            self.features,
            self.classifier,
            self.device,
            dtype=self.dtype,
            channels_last=self.channels_last,
            threads=threads,
        )

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        batch = self._to_device(parts)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def run(self, batch: torch.Tensor, output: Output) -> torch.Tensor:
        if self.threads is not None and self.device.type == "cpu" and torch.get_num_threads() != self.threads:
            use_torch_threads(self.threads)
        with torch.inference_mode():
            features: torch.Tensor = self.features(batch)
            if output == FEATURES:
                return features
            logits: torch.Tensor = self.classifier(features)
            return logits

    def _to_device(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.device.type == "cpu":
            batch = parts[0] if len(parts) == 1 else torch.cat(parts)
            return batch.to(self.dtype)
        # Gather into a reusable pinned buffer, then one asynchronous copy.
        rows = sum(int(p.shape[0]) for p in parts)
        key = tuple(parts[0].shape[1:])
        staging = self._staging.get(key)
        if staging is None or staging.shape[0] < rows:
            staging = torch.empty((rows, *key), dtype=torch.float32).pin_memory()
            self._staging[key] = staging
        host = staging[:rows]
        torch.cat(parts, out=host)
        return host.to(self.device, non_blocking=True).to(self.dtype)
