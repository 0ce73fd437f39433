"""Training a head on extracted features: the validation split, the loop, early stopping.

Pure torch on tensors; no gRPC, no files. Runs in a worker thread and yields
the GIL between steps so that inference keeps flowing.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from service.errors import UnavailableError
from service.finetune.heads import Dropout, StandardizedHead, TrainedPart, build_head
from vision_client.protocol import FineTuneConfig

CPU = torch.device("cpu")
ROWS_AT_ONCE = 256  # rows of features taken at once for statistics and validation (4 MiB of 4096 float32)


@dataclass(frozen=True)
class EpochReport:
    epoch: int  # 1-based
    epochs: int
    train_loss: float
    validation_loss: float  # nan without a validation split; mse is on standardized targets
    validation_accuracy: float  # nan for regression or without a validation split
    eta_seconds: float
    images_seen: int  # training examples processed in this epoch


Cell = tuple[int, int, int]  # a confusion matrix cell: (actual class, predicted class, examples)


@dataclass(frozen=True)
class ClassFigures:
    """How a head did on one class's validation examples (as scikit-learn's ``precision_recall_fscore_support``
    with ``zero_division=0`` counts them)."""

    precision: float  # of the examples predicted as the class, the share that are (0 when none is)
    recall: float  # of the class's examples, the share predicted as it (0 when it has none)
    support: int  # validation examples of the class


@dataclass(frozen=True)
class TrainMetrics:
    """What a training run measured; kept with the job and written to the manifest.

    For classification, ``classes`` and ``confusion`` hold the validation split's confusion matrix
    as its cells that are not zero (a dense matrix of thousands of classes would be mostly zeros):
    the per-class figures (:meth:`per_class`) are derived from it.
    """

    train_loss: float = math.nan
    validation_loss: float = math.nan  # nan without a validation split
    validation_accuracy: float = math.nan  # nan for regression or without a validation split
    best_epoch: int = 0
    epochs_run: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    train_seconds: float = 0.0
    classes: int = 0  # classes of the confusion matrix (0: regression, or no validation split)
    confusion: tuple[Cell, ...] = ()  # sorted by (actual, predicted)

    def per_class(self) -> list[ClassFigures]:
        """Precision, recall and support of each class, in the order of the job's labels."""
        predicted, actual, right = [0] * self.classes, [0] * self.classes, [0] * self.classes
        for true, guess, count in self.confusion:
            actual[true] += count
            predicted[guess] += count
            if true == guess:
                right[true] += count
        return [
            ClassFigures(
                right[c] / predicted[c] if predicted[c] else 0.0, right[c] / actual[c] if actual[c] else 0.0, actual[c]
            )
            for c in range(self.classes)
        ]

    def dense_confusion(self) -> list[list[int]]:
        """The confusion matrix as rows (actual class) of columns (predicted class)."""
        rows = [[0] * self.classes for _ in range(self.classes)]
        for true, guess, count in self.confusion:
            rows[true][guess] = count
        return rows

    def to_json(self) -> dict[str, object]:
        """JSON has no NaN: figures not measured are null. The confusion matrix is a list of cells."""
        values: dict[str, object] = {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
            if k not in _MATRIX_FIELDS
        }
        if self.classes:
            values["classes"] = self.classes
            values["confusion"] = [list(cell) for cell in self.confusion]
        return values

    @classmethod
    def from_json(cls, data: object) -> TrainMetrics:
        """Read back :meth:`to_json`; unknown keys are ignored, wrong types refused (ValueError)."""
        if not isinstance(data, dict):
            raise ValueError("metrics must be an object")
        values: dict[str, float | int] = {}
        for name, default in asdict(cls()).items():
            value = data.get(name)
            if value is None or name in _MATRIX_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"metric {name} must be a number, got {type(value).__name__}")
            values[name] = int(value) if isinstance(default, int) else float(value)
        classes, confusion = _read_confusion(data.get("classes"), data.get("confusion"))
        return cls(**values, classes=classes, confusion=confusion)  # type: ignore[arg-type]


_MATRIX_FIELDS = frozenset({"classes", "confusion"})
MAX_CLASSES = 1 << 20  # of a confusion matrix read back (a job takes far fewer: --max-labels)


def _read_confusion(classes: object, cells: object) -> tuple[int, tuple[Cell, ...]]:
    """A stored confusion matrix, checked cell by cell (a store is read, never trusted)."""
    if classes is None:
        return 0, ()
    if isinstance(classes, bool) or not isinstance(classes, int) or not 0 <= classes <= MAX_CLASSES:
        raise ValueError(f"metric classes must be a count of classes, got {classes!r}"[:200])
    if not isinstance(cells, list):
        raise ValueError("metric confusion must be a list of [actual, predicted, count] cells")
    read: list[Cell] = []
    for cell in cells:
        if (
            not isinstance(cell, list)
            or len(cell) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) for v in cell)
            or not (0 <= cell[0] < classes and 0 <= cell[1] < classes and cell[2] > 0)
        ):
            raise ValueError(f"a confusion cell must be [actual, predicted, count] within {classes} classes")
        read.append((cell[0], cell[1], cell[2]))
    return classes, tuple(sorted(read))


@dataclass(frozen=True)
class TrainResult:
    head: StandardizedHead
    metrics: TrainMetrics


class JobCancelled(UnavailableError):
    """Raised inside training when the job was cancelled."""


@dataclass(frozen=True)
class FitState:
    """Where the selection run stands after an epoch: all it needs to go on from there exactly (a
    job's checkpoint, :mod:`service.finetune.durable`). The tensors are the run's own (not copies):
    read them before the run goes on."""

    epoch: int  # epochs done
    model: dict[str, torch.Tensor]  # the model's state_dict now
    optimizer: dict[str, Any]  # the optimizer's state_dict now
    generator: torch.Tensor  # the batch order's (and views') generator state
    rng: torch.Tensor  # the dropout masks' generator state (:class:`~service.finetune.heads.Dropout`)
    best_score: tuple[float, float]
    best_epoch: int
    best_model: dict[str, torch.Tensor] | None
    stale: int  # epochs since the best one
    stopped: bool  # early stopping ended the run at this epoch
    train_loss: float
    validation_loss: float
    validation_accuracy: float


def split_indices(
    targets: torch.Tensor, fraction: float, seed: int, *, stratify: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices; stratified by class for classification."""
    generator = torch.Generator().manual_seed(seed)
    n = int(targets.shape[0])
    if fraction <= 0 or n < 2:
        return torch.randperm(n, generator=generator), torch.empty(0, dtype=torch.long)
    groups = [torch.nonzero(targets == c).flatten() for c in torch.unique(targets)] if stratify else [torch.arange(n)]
    train, validation = [], []
    for group in groups:
        group = group[torch.randperm(len(group), generator=generator)]
        take = round(len(group) * fraction)
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
    config: FineTuneConfig,
    *,
    num_outputs: int,
    labels: Sequence[str] = (),
    device: torch.device = CPU,
    on_epoch: Callable[[EpochReport], None] = lambda report: None,
    cancelled: Callable[[], bool] = lambda: False,
    resume: FitState | None = None,
    on_checkpoint: Callable[[FitState], None] | None = None,
    trunk: nn.Module | None = None,
) -> TrainResult:
    """Train ``config.head`` on ``features`` [N, D] -> ``targets`` (class ids [N] or values [N, T]).

    With augmentation, ``features`` holds ``1 + views`` rows per example, view-major: row
    ``v * N + i`` is view ``v`` of example ``i``, view 0 its own image. Each training step takes
    one view of each example of its batch, drawn from the seed; statistics, validation and the
    confusion matrix use view 0 only. ``labels`` (the class names, in the order of the class
    ids) resolve ``config.class_weights`` given by name.

    With a validation split, the epochs run on the training part and the best
    epoch is chosen on the validation part (accuracy, then loss, for classes;
    loss for regression). With ``config.refit`` the head is then trained again,
    from the same seed, on every example for that many epochs, so that no
    labelled example is left unused; the reported validation figures are
    those of the selection run.

    ``trunk``: backbone blocks trained with the head (their lr is ``config.backbone_lr_factor`` times
    the head's). Then ``features`` are the activations [R * N, ...] those blocks take, and the
    result's head is a :class:`TrainedPart` (a copy of the blocks, trained, then the head); the
    blocks given are left as they are. Features are standardized as the blocks give them before
    training.

    ``on_checkpoint`` is called with the selection run's state after each epoch, before its
    ``on_epoch``; ``resume``, such a state, makes the run go on after that epoch as if it had
    never stopped (the same figures and random streams from the same inputs).
    """
    started = time.monotonic()
    classification = config.loss == "cross_entropy"
    examples = int(targets.shape[0])
    views, rest = divmod(int(features.shape[0]), examples)
    if rest or views < 1:
        raise ValueError(f"features have {features.shape[0]} rows, not a multiple of the {examples} examples")
    train_idx, val_idx = split_indices(targets, config.validation_fraction, config.seed, stratify=classification)
    weights = loss_weights(config, targets, num_outputs, labels) if classification else None
    fit = _Fit(config, num_outputs, classification, device, cancelled, weights, views - 1, trunk=trunk)
    selection = fit.run(features, targets, train_idx, val_idx, on_epoch, resume=resume, on_checkpoint=on_checkpoint)
    model = selection.model
    if config.refit and len(val_idx) and selection.best_epoch:
        every = torch.arange(len(targets))
        model = fit.run(features, targets, every, every[:0], None, epochs=selection.best_epoch).model
    return TrainResult(
        head=model.eval().cpu(),
        metrics=TrainMetrics(
            train_loss=selection.train_loss,
            validation_loss=selection.validation_loss,
            validation_accuracy=selection.validation_accuracy,
            best_epoch=selection.best_epoch,
            epochs_run=selection.epochs_run,
            train_examples=len(train_idx) if not (config.refit and len(val_idx)) else len(targets),
            validation_examples=len(val_idx),
            train_seconds=time.monotonic() - started,
            classes=num_outputs if classification and len(val_idx) else 0,
            confusion=selection.confusion,
        ),
    )


def loss_weights(
    config: FineTuneConfig, targets: torch.Tensor, classes: int, labels: Sequence[str] = ()
) -> torch.Tensor | None:
    """The weight of each class in the loss (``CrossEntropyLoss(weight=...)``), or None: all 1.

    ``auto``: n / (classes x examples of the class), scikit-learn's "balanced", from the counts of
    every example (so that the selection run and the refit weigh alike); by name: the weights
    given, 1 for classes not named.
    """
    if config.class_weights == "none":
        return None
    if config.class_weights == "auto":
        counts = torch.bincount(targets, minlength=classes).double()
        return (len(targets) / (classes * counts.clamp(min=1))).float()
    if len(labels) != classes:
        raise ValueError("class weights by name need the class names")
    by_name = dict(config.class_weights)
    return torch.tensor([by_name.get(name, 1.0) for name in labels], dtype=torch.float32)


@dataclass
class _Outcome:
    model: StandardizedHead  # at its best epoch
    train_loss: float
    validation_loss: float
    validation_accuracy: float
    best_epoch: int
    epochs_run: int
    confusion: tuple[Cell, ...] = ()  # of the validation rows, classification only


class _Fit:
    """One training run's settings; :meth:`run` trains a fresh head from the seed."""

    def __init__(
        self,
        config: FineTuneConfig,
        num_outputs: int,
        classification: bool,
        device: torch.device,
        cancelled: Callable[[], bool],
        weights: torch.Tensor | None = None,
        views: int = 0,
        *,
        trunk: nn.Module | None = None,
    ) -> None:
        self.config = config
        self.num_outputs = num_outputs
        self.classification = classification
        self.device = device
        self.cancelled = cancelled
        self.weights = None if weights is None else weights.to(device)
        self.views = views  # augmented views per example beyond its own (rows of x: (1 + views) x examples)
        self.trunk = trunk  # backbone blocks trained with the head (x: their input activations)
        self.loss_fn: nn.Module = nn.CrossEntropyLoss(weight=self.weights) if classification else nn.MSELoss()

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        train_idx: torch.Tensor,
        val_idx: torch.Tensor,
        on_epoch: Callable[[EpochReport], None] | None,
        *,
        epochs: int | None = None,
        resume: FitState | None = None,
        on_checkpoint: Callable[[FitState], None] | None = None,
    ) -> _Outcome:
        """Train on rows ``train_idx`` of ``x`` and ``y``, choosing the epoch on rows ``val_idx``.

        The rows are taken by index, a batch at a time: the features are never copied whole
        (on the CPU they are used where they are), so training adds to a job's memory only
        a batch and the head's own. ``x`` may be kept in a narrower type than float32 (the
        pipeline keeps large jobs' in float16): each batch is taken as float32, and so is the head.
        """
        config, device = self.config, self.device
        epochs = epochs or config.epochs
        x, y, train_idx, val_idx = (t.to(device) for t in (x, y, train_idx, val_idx))
        trunk = None
        if self.trunk is not None:  # a fresh copy of the blocks given: a refit starts where selection did
            trunk = copy.deepcopy(self.trunk).to(device)
            for norm in _normalizations(trunk):
                norm.momentum = 0.0  # training steps leave the running statistics as measured
            _calibrate_normalizations(trunk, x, train_idx)
        mean, std = _statistics(x, train_idx) if trunk is None else _trunk_statistics(trunk, x, train_idx)
        target_stats: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if not self.classification:
            target_mean, target_std = _statistics(y, train_idx)
            target_stats = (target_mean, target_std)
            y = (y - target_mean) / target_std  # a copy of the targets only
        head = build_head(config.head, int(mean.shape[0]), self.num_outputs)
        _initialize(head, torch.Generator().manual_seed(config.seed))
        if trunk is None:
            model = StandardizedHead(head, mean, std, *target_stats).to(device)
        else:
            model = TrainedPart(_own_dropouts(trunk), head, mean, std, *target_stats).to(device)
        optimizer = _optimizer(config, model)
        # Every draw of the run comes from its own generators, never torch's global one, which any
        # thread of the process may use (a network built for serving, another job): the batch order
        # and views from one, the dropout masks from another (kept in checkpoints).
        generator = torch.Generator().manual_seed((config.seed + 1) % 2**64)  # any uint64 seed
        masks = torch.Generator(device=device).manual_seed((config.seed + 2) % 2**64)
        if resume is not None:  # go on after the checkpoint's epoch
            model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            generator.set_state(resume.generator)
            masks.set_state(resume.rng)
        dropouts = [module for module in model.modules() if isinstance(module, Dropout)]
        for module in dropouts:
            module.generator = masks
        try:
            return self._epochs(model, optimizer, x, y, train_idx, val_idx, generator, masks, epochs, resume, on_epoch,
                                on_checkpoint)  # fmt: skip
        finally:
            for module in dropouts:
                module.generator = None  # the model outlives the run (it is served), the generator does not

    def _epochs(
        self,
        model: StandardizedHead,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        train_idx: torch.Tensor,
        val_idx: torch.Tensor,
        generator: torch.Generator,
        masks: torch.Generator,
        epochs: int,
        resume: FitState | None,
        on_epoch: Callable[[EpochReport], None] | None,
        on_checkpoint: Callable[[FitState], None] | None,
    ) -> _Outcome:
        """:meth:`run`'s epochs (from after ``resume``'s, where one is given) and its outcome."""
        config = self.config
        best: tuple[float, float] = (math.inf, math.inf)  # lower is better
        best_epoch, best_state, stale = 0, None, 0
        train_loss = val_loss = val_acc = math.nan
        epochs_run, first = 0, 1
        if resume is not None:
            best, best_epoch, stale, best_state = resume.best_score, resume.best_epoch, resume.stale, resume.best_model
            train_loss, val_loss, val_acc = resume.train_loss, resume.validation_loss, resume.validation_accuracy
            epochs_run = resume.epoch
            first = epochs + 1 if resume.stopped else resume.epoch + 1
        for epoch in range(first, epochs + 1):
            epoch_started = time.monotonic()
            train_loss, seen = self._epoch(model, optimizer, x, y, train_idx, generator)
            if isinstance(model, TrainedPart):  # what validation, a checkpoint and the served network use
                _calibrate_normalizations(model.blocks, x, train_idx)
            epochs_run = epoch
            val_loss, val_acc = _evaluate(model, x, y, val_idx, self.classification, self.weights)
            if len(val_idx) == 0:
                score = (train_loss, 0.0)
            elif self.classification:
                score = (-val_acc, val_loss)
            else:
                score = (val_loss, 0.0)
            if score < best:
                best, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            stopping = bool(config.early_stopping_patience) and stale >= config.early_stopping_patience
            if on_checkpoint is not None:
                on_checkpoint(
                    FitState(
                        epoch, model.state_dict(), optimizer.state_dict(), generator.get_state(), masks.get_state(),
                        best, best_epoch, best_state, stale, stopping, train_loss, val_loss, val_acc,
                    )
                )  # fmt: skip
            if on_epoch is not None:
                remaining = 0 if stopping else epochs - epoch
                eta = remaining * (time.monotonic() - epoch_started) * (1 + config.refit * config.validation_fraction)
                on_epoch(EpochReport(epoch, epochs, train_loss, val_loss, val_acc, eta, seen))
            if stopping:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        val_loss, val_acc = _evaluate(model, x, y, val_idx, self.classification, self.weights)
        confusion = _confusion(model, x, y, val_idx, self.num_outputs) if self.classification else ()
        return _Outcome(model, train_loss, val_loss, val_acc, best_epoch, epochs_run, confusion)

    def _epoch(
        self,
        model: StandardizedHead,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        rows: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[float, int]:
        model.train()
        norms = _normalizations(model.blocks) if isinstance(model, TrainedPart) else []
        order = rows[torch.randperm(len(rows), generator=generator).to(rows.device)]
        total, seen = 0.0, 0
        for start in range(0, len(order), self.config.batch_size):
            if self.cancelled():
                raise JobCancelled("the job was cancelled")
            batch = order[start : start + self.config.batch_size]
            for norm in norms:  # a batch's statistics; one row has none: it is normalised by the measured ones
                norm.train(len(batch) > 1)
            rows = batch
            if self.views:  # one view of each example, its own image (view 0) among them
                view = torch.randint(0, self.views + 1, (len(batch),), generator=generator).to(batch.device)
                rows = batch + view * len(y)
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(model.standardized(x[rows].float()), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
            time.sleep(0)  # let the inference threads have the interpreter between steps
        return total / max(seen, 1), seen


def _initialize(head: nn.Module, generator: torch.Generator) -> None:
    """Draw ``head``'s Linear layers' weights and biases as torch's default initialization does
    (uniform within 1 / sqrt(fan_in)), in module order, from ``generator``; the head's other layers
    (normalisations) start without a draw."""
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0.0
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)


def _own_dropouts(trunk: nn.Module) -> nn.Module:
    """``trunk`` (the job's own copy of the blocks) with each of torch's Dropouts made a
    :class:`~service.finetune.heads.Dropout` of the same p, whose masks the run draws."""
    for parent in list(trunk.modules()):
        for child_name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, child_name, Dropout(child.p))
    return trunk


def _optimizer(config: FineTuneConfig, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optimizer
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if isinstance(model, TrainedPart):  # the blocks learn at their own rate
        blocks = list(model.blocks.parameters())
        taken = {id(parameter) for parameter in blocks}
        groups = [
            {"params": [parameter for parameter in model.parameters() if id(parameter) not in taken]},
            {"params": blocks, "lr": opt.lr * config.backbone_lr_factor},
        ]
    if opt.kind == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.Adam(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)


def _statistics(values: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation of rows ``rows`` of ``values``.

    A column that is constant in training (common for post-ReLU features) gets
    a deviation of 1, as scikit-learn's StandardScaler does: dividing by a tiny
    deviation would blow up any non-zero value it takes at serving time. Up to
    :data:`ROWS_AT_ONCE` rows are taken at once; more are summed a slice at a time
    (in float64), so that no copy of the training rows is ever made.
    """
    if len(rows) <= ROWS_AT_ONCE:
        taken = values[rows].float()
        mean = taken.mean(0)
        std = taken.std(0, unbiased=False) if len(rows) >= 2 else None
    else:
        total = torch.zeros(values.shape[1:], dtype=torch.float64, device=values.device)
        for part in _slices(rows):
            total += values[part].sum(0, dtype=torch.float64)
        mean64 = total / len(rows)
        squares = torch.zeros_like(total)
        for part in _slices(rows):
            squares += ((values[part].double() - mean64) ** 2).sum(0)
        mean, std = mean64.float(), (squares / len(rows)).sqrt().float()
    if std is None:
        return mean, torch.ones_like(mean)
    return mean, _usable(std, mean)


def _usable(std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``std``, with 1 for columns constant in training (see :func:`_statistics`)."""
    return torch.where(std < 1e-6 * (1 + mean.abs()), torch.ones_like(std), std)


def _normalizations(trunk: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in trunk.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def _calibrate_normalizations(trunk: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> None:
    """Measure the running statistics of ``trunk``'s batch normalizations on rows ``rows`` of ``x``
    (the training examples, each counted once: a cumulative average, :data:`ROWS_AT_ONCE` rows at a
    time), in place of what they held. Done before the blocks train and after each epoch.

    Why: the served network, validation and the head's standardization run the running statistics,
    which must describe the activations the job brings the blocks (as AdaBN re-estimates them for a
    new domain) with the weights they have now. The base's describe nothing of the first (with a
    base of random weights, mean 0 and variance 1, where a random ResNet101's ``layer4`` takes
    activations some 10^4 times unit scale); and while the blocks train, each step normalizes its
    batch by the batch's own statistics (as any training of a network with batch normalizations),
    and the running averages those steps leave behind lag weights that moved under them in a job's
    few, small batches. Measuring the epoch's end weights once on every training example gives
    the network the statistics its training saw (as "precise BN" does). Only the normalizations run
    in training mode here (dropout stays off, no random draws); with fewer than two training rows
    what they held stays.
    """
    norms = _normalizations(trunk)
    if not norms or len(rows) < 2:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    trunk.eval()
    for norm in norms:
        norm.train()
    try:
        with torch.no_grad():
            for part in _slices(rows):
                if len(part) > 1:  # a normalization cannot measure a batch of one
                    trunk(x[part].float())
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        trunk.eval()


def _trunk_statistics(trunk: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_statistics` of ``trunk``'s outputs on rows ``rows`` of ``x``, the blocks as they are
    before training: run in inference mode :data:`ROWS_AT_ONCE` rows at a time, their sums kept in
    float64 (the outputs are never held together)."""
    trunk = trunk.to(x.device).eval()
    total = squares = None
    with torch.inference_mode():
        for part in _slices(rows):
            outputs = trunk(x[part].float()).double()
            total = outputs.sum(0) if total is None else total + outputs.sum(0)
            squares = (outputs**2).sum(0) if squares is None else squares + (outputs**2).sum(0)
    if total is None or squares is None:
        raise ValueError("no training rows to standardize the blocks' output on")
    mean64 = total / len(rows)
    mean = mean64.float()
    if len(rows) < 2:
        return mean, torch.ones_like(mean)
    std = (squares / len(rows) - mean64**2).clamp(min=0).sqrt().float()
    return mean, _usable(std, mean)


def _slices(rows: torch.Tensor) -> Iterator[torch.Tensor]:
    """``rows`` in consecutive parts of at most :data:`ROWS_AT_ONCE`."""
    for start in range(0, len(rows), ROWS_AT_ONCE):
        yield rows[start : start + ROWS_AT_ONCE]


def _evaluate(
    model: StandardizedHead,
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    classification: bool,
    weights: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy on rows ``rows``, :data:`ROWS_AT_ONCE` rows at a time. With class
    ``weights`` the loss is their weighted mean, as ``CrossEntropyLoss(weight=weights)`` takes it."""
    if len(rows) == 0:
        return math.nan, math.nan
    model.eval()
    loss_sum, correct, elements = 0.0, 0, 0
    weight_sum = 0.0
    with torch.inference_mode():
        for part in _slices(rows):
            outputs, expected = model.standardized(x[part].float()), y[part]
            if classification:
                loss_sum += float(nn.functional.cross_entropy(outputs, expected, weight=weights, reduction="sum"))
                correct += int((outputs.argmax(1) == expected).sum())
                elements += len(part)
                weight_sum += float(weights[expected].sum()) if weights is not None else len(part)
            else:
                loss_sum += float(nn.functional.mse_loss(outputs, expected, reduction="sum"))
                elements += expected.numel()
    accuracy = correct / len(rows) if classification else math.nan
    if classification:
        return loss_sum / weight_sum, accuracy
    return loss_sum / elements, accuracy


def _confusion(
    model: StandardizedHead, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, classes: int
) -> tuple[Cell, ...]:
    """The confusion matrix of ``model`` on rows ``rows``: its cells that are not zero, sorted.

    Counted a slice at a time as codes ``actual * classes + predicted``, so that it costs
    the validation rows' predictions, never a dense ``classes x classes`` matrix.
    """
    counts: dict[int, int] = {}
    model.eval()
    with torch.inference_mode():
        for part in _slices(rows):
            predicted = model.standardized(x[part].float()).argmax(1)
            codes, found = torch.unique(y[part] * classes + predicted, return_counts=True)
            for code, count in zip(codes.tolist(), found.tolist(), strict=True):
                counts[code] = counts.get(code, 0) + count
    return tuple((code // classes, code % classes, count) for code, count in sorted(counts.items()))
