"""Training a head on extracted features: the validation split, the loop, early stopping.

Pure torch on tensors; no gRPC, no files. Runs in a worker thread and yields
the GIL between steps so that inference keeps flowing.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from service.errors import UnavailableError
from service.finetune.heads import StandardizedHead, build_head
from service.finetune.spec import FineTuneSpec


@dataclass(frozen=True)
class EpochReport:
    epoch: int  # 1-based
    epochs: int
    train_loss: float
    validation_loss: float  # nan without a validation split; mse is on standardized targets
    validation_accuracy: float  # nan for regression or without a validation split
    eta_seconds: float
    images_seen: int  # training examples processed in this epoch


@dataclass
class TrainResult:
    head: StandardizedHead
    train_loss: float
    validation_loss: float
    validation_accuracy: float
    best_epoch: int
    epochs_run: int
    train_examples: int
    validation_examples: int
    train_seconds: float


class JobCancelled(UnavailableError):
    """Raised inside training when the job was cancelled."""


def split_indices(
    targets: torch.Tensor, fraction: float, seed: int, *, stratify: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices; stratified by class for classification."""
    generator = torch.Generator().manual_seed(seed)
    n = int(targets.shape[0])
    if fraction <= 0 or n < 2:
        return torch.randperm(n, generator=generator), torch.empty(0, dtype=torch.long)
    groups = [torch.nonzero(targets == c).flatten() for c in targets.unique()] if stratify else [torch.arange(n)]
    train, validation = [], []
    for group in groups:
        group = group[torch.randperm(len(group), generator=generator)]
        take = int(round(len(group) * fraction))
        take = min(take, len(group) - 1)  # every class keeps a training example
        validation.append(group[:take])
        train.append(group[take:])
    train_idx, val_idx = torch.cat(train), torch.cat(validation)
    if len(val_idx) == 0:  # tiny sets: still hold one example out
        val_idx, train_idx = train_idx[:1], train_idx[1:]
    return train_idx[torch.randperm(len(train_idx), generator=generator)], val_idx


def train_head(
    features: torch.Tensor,
    targets: torch.Tensor,
    spec: FineTuneSpec,
    *,
    num_outputs: int,
    device: torch.device = torch.device("cpu"),
    on_epoch: Callable[[EpochReport], None] = lambda report: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Train ``spec.head`` on ``features`` [N, D] -> ``targets`` (class ids [N] or values [N, T])."""
    started = time.monotonic()
    classification = spec.loss == "cross_entropy"
    train_idx, val_idx = split_indices(targets, spec.validation_fraction, spec.seed, stratify=classification)
    x_train, y_train = features[train_idx].to(device), targets[train_idx].to(device)
    x_val, y_val = features[val_idx].to(device), targets[val_idx].to(device)

    mean, std = _statistics(x_train)
    target_stats = (None, None)
    if not classification:
        target_stats = _statistics(y_train)
        y_train = (y_train - target_stats[0]) / target_stats[1]
        y_val = (y_val - target_stats[0]) / target_stats[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        head = build_head(spec.head, features.shape[1], num_outputs)
        model = StandardizedHead(head, mean, std, *target_stats).to(device)
    optimizer = _optimizer(spec, model)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    generator = torch.Generator().manual_seed(spec.seed + 1)

    best_loss, best_epoch, best_state, stale = math.inf, 0, None, 0
    train_loss = val_loss = val_acc = math.nan
    epochs_run = 0
    for epoch in range(1, spec.epochs + 1):
        epoch_started = time.monotonic()
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, len(order), spec.batch_size):
            if cancelled():
                raise JobCancelled("the job was cancelled")
            batch = order[start : start + spec.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model.standardized(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
            time.sleep(0)  # let the inference threads have the interpreter between steps
        train_loss = total / max(seen, 1)
        epochs_run = epoch
        val_loss, val_acc = _evaluate(model, x_val, y_val, loss_fn, classification)
        monitored = val_loss if len(x_val) else train_loss
        if monitored < best_loss - 1e-7:
            best_loss, best_epoch, stale = monitored, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        elapsed = time.monotonic() - epoch_started
        stopping = bool(spec.early_stopping_patience) and stale >= spec.early_stopping_patience
        remaining = 0 if stopping else spec.epochs - epoch
        on_epoch(EpochReport(epoch, spec.epochs, train_loss, val_loss, val_acc, remaining * elapsed, seen))
        if stopping:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    val_loss, val_acc = _evaluate(model, x_val, y_val, loss_fn, classification)
    model.eval()
    return TrainResult(
        head=model.cpu(),
        train_loss=train_loss,
        validation_loss=val_loss,
        validation_accuracy=val_acc,
        best_epoch=best_epoch,
        epochs_run=epochs_run,
        train_examples=len(x_train),
        validation_examples=len(x_val),
        train_seconds=time.monotonic() - started,
    )


def _optimizer(spec: FineTuneSpec, model: nn.Module) -> torch.optim.Optimizer:
    opt = spec.optimizer
    if opt.kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)


def _statistics(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation (never zero) of the training rows."""
    mean = values.mean(0)
    if len(values) < 2:
        return mean, torch.ones_like(mean)
    return mean, values.std(0, unbiased=False).clamp_min(1e-6)


def _evaluate(
    model: StandardizedHead, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, classification: bool
) -> tuple[float, float]:
    if len(x) == 0:
        return math.nan, math.nan
    model.eval()
    with torch.inference_mode():
        outputs = model.standardized(x)
        loss = float(loss_fn(outputs, y))
        accuracy = float((outputs.argmax(1) == y).float().mean()) if classification else math.nan
    return loss, accuracy
