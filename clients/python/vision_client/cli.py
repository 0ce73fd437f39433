"""``vision-client``: classify images, fine-tune heads, list models and check health from a shell.

    vision-client [--target HOST:PORT | --url http[s]://HOST:PORT] [--token TOKEN] [--timeout S]
                  [--tls] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] COMMAND

    vision-client classify IMAGE... [--model M] [--top-k K] [--json]
    vision-client models [--json]
    vision-client models rollback NAME VERSION [--json]
    vision-client health [--json]
    vision-client fine-tune DIR --base M --output NAME [--head H] [--epochs N] ... [--plot FILE] [--json]
    vision-client jobs [--json]
    vision-client jobs show JOB_ID [--json]
    vision-client cancel JOB_ID [--json]
    vision-client delete-model NAME

The target defaults to ``$VISION_CLIENT_TARGET`` or ``localhost:8001`` and the
token to ``$VISION_CLIENT_TOKEN``. ``--url`` (or a URL as the target) talks to the
server's HTTP port instead (``https://`` with the TLS options), with the same commands.
Errors print ``vision-client: error: ...`` and exit 1; ``health`` exits 1 when the
server is not ready, ``fine-tune`` when the job does not succeed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

from vision_client import _plot
from vision_client._client import DEFAULT_MODEL, DEFAULT_TIMEOUT, Client
from vision_client._types import FineTuneResult, JobEvent, JobInfo, ModelInfo, Prediction
from vision_client._version import __version__
from vision_client.errors import UnavailableError, VisionClientError
from vision_client.protocol.fine_tuning import (
    HEAD_KINDS,
    IMAGE_SUFFIXES,
    LAYER_KINDS,
    LOSSES,
    OPTIMIZER_KINDS,
    AugmentationConfig,
    FineTuneConfig,
    HeadConfig,
    Layer,
    OptimizerConfig,
    parse_layers,
)

PROG = "vision-client"
DEFAULT_TARGET = "localhost:8001"


@dataclass(frozen=True)
class Defaults:
    """Option defaults, read from the environment once, in ``main()``."""

    target: str = DEFAULT_TARGET
    token: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Defaults:
        return cls(
            target=env.get("VISION_CLIENT_TARGET") or DEFAULT_TARGET,
            token=env.get("VISION_CLIENT_TOKEN") or None,
        )


def build_parser(defaults: Defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Client of vision-serving (image classification over gRPC or HTTP)."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_connection_options(parser, defaults)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # The connection options are accepted after the command too; SUPPRESS keeps those
    # given before it when they are not repeated.
    connection = argparse.ArgumentParser(add_help=False)
    _add_connection_options(connection, None)

    classify = commands.add_parser(
        "classify", parents=[connection], help="the top classes of images", description="Classify image files."
    )
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files ('-' reads one from stdin)")
    classify.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model to run (default {DEFAULT_MODEL})")
    classify.add_argument("--top-k", "-k", type=_positive_int, default=5, help="classes per image (default 5)")
    classify.add_argument("--json", action="store_true", help="print JSON")

    models = commands.add_parser(
        "models",
        parents=[connection],
        help="list the server's models, or roll one back",
        description=(
            "List the server's models and their versions (the served one marked *); 'models rollback NAME "
            "VERSION' serves an older version of a fine-tuned model, one its store keeps, on every replica."
        ),
    )
    models.add_argument("action", nargs="?", choices=("rollback",), help="roll a fine-tuned model back")
    models.add_argument("name", nargs="?", metavar="NAME", help="the fine-tuned model to roll back")
    models.add_argument("version", nargs="?", metavar="VERSION", help="the version to serve again (1, 2, ...)")
    models.add_argument("--json", action="store_true", help="print JSON")

    health = commands.add_parser(
        "health", parents=[connection], help="server and model readiness (exit 1 if not ready)"
    )
    health.add_argument("--json", action="store_true", help="print JSON")

    fine_tune = commands.add_parser(
        "fine-tune",
        parents=[connection],
        help="train a new head on a served model, from a folder of labelled images",
        description=(
            "Fine-tune a new classification head on a served model's frozen backbone. DIR holds one "
            "sub-folder per class, named after it, with the class's images inside (torchvision's "
            "ImageFolder layout); other files are skipped. With --loss mse each sub-folder's name is "
            "instead a number: its images' target. Progress goes to stderr, a summary to stdout. "
            "The job is waited for without a deadline; Ctrl-C cancels it. Every option sets the "
            "field of vision_client.FineTuneConfig named in its help."
        ),
    )
    fine_tune.add_argument(
        "directory",
        type=Path,
        nargs="?",
        metavar="DIR",
        help="DIR/<class>/<image> files, uploaded (or --dataset: images the server reads itself)",
    )
    fine_tune.add_argument("--base", required=True, metavar="MODEL", help="served model to build on (base_model)")
    fine_tune.add_argument(
        "--output", required=True, metavar="NAME", help="name to serve the new model under (output_model)"
    )
    for option in FINE_TUNE_OPTIONS:
        option.add_to(fine_tune)
    fine_tune.add_argument(
        "--plot", type=Path, metavar="FILE", help=f"save loss and accuracy curves per epoch ({_plot.INSTALL_HINT})"
    )
    fine_tune.add_argument("--json", action="store_true", help="print the result as JSON")

    jobs = commands.add_parser(
        "jobs",
        parents=[connection],
        help="list fine-tuning jobs, or show one",
        description=(
            "List fine-tuning jobs; 'jobs show JOB_ID' shows one: its settings, its figures and, for "
            "classes, each class's precision and recall and the confusion matrix on the validation split."
        ),
    )
    jobs.add_argument("action", nargs="?", choices=("show",), help="show one job")
    jobs.add_argument("job_id", nargs="?", metavar="JOB_ID", help="the job to show")
    jobs.add_argument("--json", action="store_true", help="print JSON")

    cancel = commands.add_parser("cancel", parents=[connection], help="cancel a fine-tuning job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--json", action="store_true", help="print JSON")

    delete = commands.add_parser("delete-model", parents=[connection], help="delete a fine-tuned model")
    delete.add_argument("name", metavar="NAME")
    return parser


def _add_connection_options(parser: argparse.ArgumentParser, defaults: Defaults | None) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if defaults is None else value

    parser.add_argument(
        "--target",
        "--url",
        dest="target",
        default=default(defaults.target if defaults else None),
        help=(
            "server address: the gRPC port, host:port or dns:///name:port, or the HTTP port's URL, "
            f"http://host:8000 or https://host (env VISION_CLIENT_TARGET; default {DEFAULT_TARGET})"
        ),
    )
    parser.add_argument(
        "--token", default=default(defaults.token if defaults else None), help="bearer token (env VISION_CLIENT_TOKEN)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT),
        help=f"seconds per call (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect with TLS (the system's root certificates); an https:// URL implies it",
    )
    parser.add_argument(
        "--tls-ca", metavar="FILE", default=default(None), help="PEM CA certificates of the server (implies --tls)"
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", default=default(None), help="PEM client certificate, for mutual TLS"
    )
    parser.add_argument("--tls-key", metavar="FILE", default=default(None), help="PEM key of --tls-cert")
    parser.add_argument(
        "--allow-insecure-token",
        action="store_true",
        default=default(False),
        help="send --token over plaintext to a non-loopback target (only on a trusted or encrypted network)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(Defaults.from_env(os.environ)).parse_args(argv)
    try:
        client = Client(
            args.target,
            timeout=args.timeout,
            token=args.token,
            tls=args.tls or None,
            root_certificates=args.tls_ca,
            client_certificate=args.tls_cert,
            client_key=args.tls_key,
            allow_insecure_token=args.allow_insecure_token,
        )
    except ValueError as error:  # connection options that cannot work together
        return _fail(str(error))
    try:
        with client:
            return COMMANDS[args.command](client, args)
    except UnavailableError as error:
        return _fail(f"{error} (target {args.target})")
    except VisionClientError as error:
        return _fail(str(error))
    except OSError as error:  # an image file that cannot be read
        return _fail(f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
    except _plot.PlotUnavailableError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


# -- fine-tuning options ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigOption:
    """A ``fine-tune`` flag and the :class:`FineTuneConfig` field it sets.

    ``part`` is ``"head"``, ``"optimizer"`` or ``"augmentation"`` for a field of the nested
    dataclass, ``""`` for the config's own. The default shown is the dataclass's; an option not given
    is left out, so the dataclass's default applies and the dataclass checks the value.
    """

    flag: str
    part: str
    name: str
    help: str
    choices: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return f"config_{self.part}_{self.name}"

    @property
    def path(self) -> str:
        """The field's path in the config: ``head.hidden``, ``epochs``."""
        return f"{self.part}.{self.name}" if self.part else self.name

    def default(self) -> Any:
        owner = {
            "": FineTuneConfig,
            "head": HeadConfig,
            "optimizer": OptimizerConfig,
            "augmentation": AugmentationConfig,
        }[self.part]
        (spec,) = [f for f in fields(owner) if f.name == self.name]
        return spec.default

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        default = self.default()
        text = f"{self.help} ({self.path}; default {default})"
        if self.path == "head.layers":  # one line of the protocol's layer syntax
            parser.add_argument(
                self.flag, dest=self.dest, type=_layers, default=argparse.SUPPRESS, metavar="LAYERS", help=self.help
            )
            return
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(self.flag, dest=self.dest, action=action, default=argparse.SUPPRESS, help=text)
            return
        if isinstance(default, tuple):  # a pair of numbers: crop_scale
            text = f"{self.help} ({self.path}; default {' '.join(map(str, default))})"
            parser.add_argument(
                self.flag,
                dest=self.dest,
                type=type(default[0]),
                nargs=len(default),
                default=argparse.SUPPRESS,
                metavar=("LOW", "HIGH"),
                help=text,
            )
            return
        parser.add_argument(
            self.flag,
            dest=self.dest,
            type=type(default),
            choices=self.choices or None,
            default=argparse.SUPPRESS,
            metavar=None if self.choices else self.name.split("_")[-1].upper(),
            help=text,
        )


FINE_TUNE_OPTIONS = (
    ConfigOption("--head", "head", "kind", "head architecture", HEAD_KINDS),
    ConfigOption("--hidden", "head", "hidden", "hidden width of two_layer and parallel heads"),
    ConfigOption("--blocks", "head", "blocks", "blocks of a parallel head"),
    ConfigOption("--dropout", "head", "dropout", "dropout on the head's input while training"),
    ConfigOption(
        "--layers",
        "head",
        "layers",
        f"a custom head, its layers in one line ({', '.join(LAYER_KINDS)}), the output Linear added after them: "
        "e.g. 'linear:512,batch_norm,relu,dropout:0.25' or 'parallel(linear:64|linear:64),relu' "
        "(or a JSON list of layers)",
    ),
    ConfigOption("--optimizer", "optimizer", "kind", "optimizer", OPTIMIZER_KINDS),
    ConfigOption("--lr", "optimizer", "lr", "learning rate"),
    ConfigOption("--momentum", "optimizer", "momentum", "SGD momentum"),
    ConfigOption("--weight-decay", "optimizer", "weight_decay", "weight decay"),
    ConfigOption("--beta1", "optimizer", "beta1", "Adam's first beta"),
    ConfigOption("--beta2", "optimizer", "beta2", "Adam's second beta"),
    ConfigOption("--loss", "", "loss", "cross_entropy: folders are classes; mse: folder names are targets", LOSSES),
    ConfigOption("--epochs", "", "epochs", "training epochs"),
    ConfigOption("--batch-size", "", "batch_size", "examples per training step"),
    ConfigOption("--validation-fraction", "", "validation_fraction", "share of examples held out"),
    ConfigOption(
        "--early-stopping-patience", "", "early_stopping_patience", "epochs without a better validation loss; 0: never"
    ),
    ConfigOption("--seed", "", "seed", "seed of the split and the head's initial weights"),
    ConfigOption("--refit", "", "refit", "train again on every example for the best epoch count"),
    ConfigOption("--replace", "", "replace", "replace a fine-tuned model of that name"),
    ConfigOption("--augment-views", "augmentation", "views", "random views of each image whose features train too"),
    ConfigOption("--crop", "augmentation", "crop", "views are random resized crops"),
    ConfigOption("--crop-scale", "augmentation", "crop_scale", "a crop's share of the image's area"),
    ConfigOption("--flip", "augmentation", "horizontal_flip", "views are mirrored with probability 1/2"),
    ConfigOption(
        "--class-weights", "", "class_weights", "none, auto (balanced from the counts), or CLASS=WEIGHT,CLASS=WEIGHT"
    ),
    ConfigOption(
        "--dataset",
        "",
        "dataset",
        "train on images the server reads itself instead of DIR: s3://bucket/prefix/ or a directory on the "
        "server under its --dataset-roots, one folder (prefix) per class",
    ),
    ConfigOption(
        "--train-backbone-blocks",
        "",
        "train_backbone_blocks",
        "train that many of the last blocks of the base model's backbone with the head; 0: a frozen backbone",
    ),
    ConfigOption("--backbone-lr-factor", "", "backbone_lr_factor", "the trained blocks' lr as a factor of --lr"),
)


def _class_weights(text: str) -> object:
    """``--class-weights``: a mode, or ``CLASS=WEIGHT`` pairs separated by commas (the dataclass checks them)."""
    if "=" not in text:
        return text
    weights: dict[str, object] = {}
    for pair in text.split(","):
        name, _, weight = pair.rpartition("=")
        try:
            weights[name] = float(weight)
        except ValueError:
            raise VisionClientError(f"--class-weights: {pair!r} is not CLASS=WEIGHT with a number") from None
    return weights


def _layers(text: str) -> tuple[Layer, ...]:
    """``--layers``: the protocol's one reading of a layer list; argparse reports its error."""
    try:
        return parse_layers(text)
    except VisionClientError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def config_from_args(args: argparse.Namespace) -> FineTuneConfig:
    """The job's config: ``--base``, ``--output`` and the options given; the dataclass's defaults for the rest."""
    given: dict[str, dict[str, Any]] = {"": {}, "head": {}, "optimizer": {}, "augmentation": {}}
    for option in FINE_TUNE_OPTIONS:
        if hasattr(args, option.dest):
            given[option.part][option.name] = getattr(args, option.dest)
    if "crop_scale" in given["augmentation"]:
        given["augmentation"]["crop_scale"] = tuple(given["augmentation"]["crop_scale"])
    if "class_weights" in given[""]:
        given[""]["class_weights"] = _class_weights(given[""]["class_weights"])
    return FineTuneConfig(
        base_model=args.base,
        output_model=args.output,
        head=HeadConfig(**given["head"]),
        optimizer=OptimizerConfig(**given["optimizer"]),
        augmentation=AugmentationConfig(**given["augmentation"]),
        **given[""],
    )


def _regression_examples(examples: list[tuple[Path, str]]) -> list[tuple[Path, list[float]]]:
    """With ``--loss mse``: each folder's name, a number, is the target of its images."""
    targets: dict[str, list[float]] = {}
    for _, name in examples:
        if name not in targets:
            try:
                targets[name] = [float(name)]
            except ValueError:
                raise VisionClientError(
                    f"with --loss mse each sub-folder's name is its images' target, a number; {name!r} is not"
                ) from None
    return [(path, targets[name]) for path, name in examples]


# -- commands ---------------------------------------------------------------------------


def classify_command(client: Client, args: argparse.Namespace) -> int:
    images = [sys.stdin.buffer.read() if name == "-" else name for name in args.images]
    results = client.classify(images, model=args.model, top_k=args.top_k)
    if args.json:
        _print_json(
            [
                {"image": name, "predictions": [_prediction_json(rank, p) for rank, p in enumerate(predictions, 1)]}
                for name, predictions in zip(args.images, results, strict=True)
            ]
        )
        return 0
    width = max(len(name) for name in args.images)
    for name, predictions in zip(args.images, results, strict=True):
        for rank, p in enumerate(predictions, 1):
            print(f"{name:<{width}}  {rank:>2}  {p.score:.4f}  {p.label} ({p.index})")
    return 0


def models_command(client: Client, args: argparse.Namespace) -> int:
    if args.action == "rollback" or args.name:
        if args.action != "rollback" or not args.name or not args.version:
            return _fail("models rollback needs a NAME and a VERSION (vision-client models lists them)")
        model = client.rollback_model(args.name, args.version)
        if args.json:
            _print_json(_model_json(model))
        else:
            print(f"{model.name} serves version {model.version} (versions kept: {_versions(model)})")
        return 0
    models = client.models(labels=False)
    if args.json:
        _print_json([_model_json(m) for m in models])
        return 0
    header = ("NAME", "STATE", "CLASSES", "INPUT", "BASE MODEL", "VERSIONS", "REASON")
    rows = [
        (
            m.name,
            m.state,
            str(m.num_classes),
            f"{m.input_size}x{m.input_size}",
            m.base_model or "-",
            _versions(m),
            m.reason,
        )
        for m in models
    ]
    _print_table(header, rows)
    return 0


def health_command(client: Client, args: argparse.Namespace) -> int:
    live = client.live()
    ready = client.ready()
    models = {m.name: m for m in client.models(labels=False)}
    model_ready = {name: client.ready(name) for name in models}
    if args.json:
        _print_json(
            {
                "target": args.target,
                "live": live,
                "ready": ready,
                "models": {
                    name: {"ready": model_ready[name], "state": m.state, "reason": m.reason}
                    for name, m in models.items()
                },
            }
        )
    else:
        rows = [("server", "live" if live else "not live", "ready" if ready else "not ready", "")]
        rows += [
            (name, "", "ready" if model_ready[name] else "not ready", " ".join(filter(None, (m.state, m.reason))))
            for name, m in models.items()
        ]
        _print_table(("SERVICE", "LIVE", "READY", "STATE"), rows)
    return 0 if live and ready else 1


def image_folder(root: Path) -> tuple[list[tuple[Path, str]], int]:
    """The ``(image, class)`` pairs of an ImageFolder tree, and how many other files were skipped.

    Classes are the sub-folders of ``root`` (hidden ones left out); each class's images
    are found at any depth below its folder, in sorted order.
    """
    if not root.is_dir():
        raise FileNotFoundError(2, "not a directory", str(root))
    examples: list[tuple[Path, str]] = []
    skipped = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                examples.append((path, folder.name))
            else:
                skipped += 1
    if not examples:
        raise VisionClientError(
            f"no images in {root}: put each class's images in a sub-folder named after it, "
            f"e.g. {root}/cat/1.jpg ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return examples, skipped


def fine_tune_command(client: Client, args: argparse.Namespace) -> int:
    config = config_from_args(args)  # before reading the folder: a bad option fails fast
    if args.plot is not None:
        _plot.check_available()  # before the job, not after it
    if (args.directory is None) == (not config.dataset):
        raise VisionClientError("give DIR (images to upload) or --dataset (images the server reads), one of them")
    if config.dataset:
        print(f"training on the dataset {config.dataset} (read by the server)", file=sys.stderr)
        return _run_fine_tune(client, args, config, ())
    examples, skipped = image_folder(args.directory)
    classes = sorted({label for _, label in examples})
    note = ""
    if skipped:
        note = f"; skipped {_count(skipped, 'file')} that are not images ({', '.join(sorted(IMAGE_SUFFIXES))})"
    noun = "class" if config.loss == "cross_entropy" else "target"
    counts = f"{_count(len(examples), 'image')} of {_count(len(classes), noun)}"
    labelled = examples if config.loss == "cross_entropy" else _regression_examples(examples)
    print(f"uploading {counts} from {args.directory}{note}", file=sys.stderr)
    return _run_fine_tune(client, args, config, labelled)


def _run_fine_tune(client: Client, args: argparse.Namespace, config: FineTuneConfig, labelled: Any) -> int:
    progress = Progress(sys.stderr)
    try:
        # The job takes what it takes (no deadline); Ctrl-C cancels it.
        result = client.fine_tune(config, labelled, on_event=progress, timeout=None)
    except KeyboardInterrupt:
        progress.end()
        if progress.job_id:
            client.cancel_job(progress.job_id)
            print(f"{PROG}: cancelled job {progress.job_id}", file=sys.stderr)
        raise
    finally:
        progress.end()
    plot = None
    if args.plot is not None and result.epochs:
        plot = _plot.plot_training(
            result.epochs,
            args.plot,
            title=f"{result.output_model}: {result.job.head} head on {result.job.base_model}, {result.job.optimizer}",
            validation=any(event.validation_loss for event in result.epochs),
            accuracy=result.job.loss == "cross_entropy",
        )
    if args.json:
        _print_json({**_job_json(result.job), "plot": None if plot is None else str(plot)})
    else:
        _print_summary(result, plot)
    return 0 if result.succeeded else 1


def jobs_command(client: Client, args: argparse.Namespace) -> int:
    if args.action == "show" or args.job_id:
        if not args.job_id:
            return _fail("jobs show needs a JOB_ID (vision-client jobs lists them)")
        return _show_job(client.job(args.job_id), as_json=args.json)
    jobs = client.jobs()
    if args.json:
        _print_json([_job_json(job) for job in jobs])
        return 0
    header = ("ID", "STATE", "BASE MODEL", "OUTPUT", "HEAD", "EPOCHS", "EXAMPLES", "VAL ACC", "ERROR")
    rows = [
        (
            job.id,
            job.state,
            job.base_model,
            job.output_model,
            job.head,
            f"{job.metrics.epochs_run}/{job.epochs}" if job.state == "succeeded" else str(job.epochs),
            str(job.examples),
            f"{job.metrics.validation_accuracy:.3f}" if _has_accuracy(job) else "-",
            job.error,
        )
        for job in jobs
    ]
    _print_table(header, rows)
    return 0


SHOWN_MATRIX_CLASSES = 20  # a confusion matrix wider than this is shown as its largest confusions
SHOWN_CONFUSIONS = 20


def _show_job(job: JobInfo, *, as_json: bool) -> int:
    """``jobs show``: one job's settings and figures; per class and the confusion matrix for classes."""
    if as_json:
        _print_json({**_job_json(job), "confusion_matrix": job.metrics.confusion_matrix()})
        return 0
    m = job.metrics
    print(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))
    rows = [
        ("base model", job.base_model),
        ("output model", job.output_model),
        ("head", f"{job.head}, {job.optimizer}, {job.loss}"),
        ("classes" if job.loss == "cross_entropy" else "outputs", f"{len(job.labels)}: {' '.join(job.labels)}"),
        ("examples", str(job.examples)),
    ]
    if job.config is not None:
        augmentation = job.config.augmentation
        if augmentation.views:
            parts = [f"{augmentation.views} views"]
            if augmentation.crop:
                parts.append("random resized crop {:g}-{:g}".format(*augmentation.crop_scale))
            if augmentation.horizontal_flip:
                parts.append("horizontal flip")
            rows.append(("augmentation", ", ".join(parts)))
        weights = job.config.class_weights
        if weights != "none":
            shown = weights if isinstance(weights, str) else " ".join(f"{k}={v:g}" for k, v in dict(weights).items())
            rows.append(("class weights", shown))
        if job.config.train_backbone_blocks:
            blocks = job.config.train_backbone_blocks
            rows.append(("trained backbone", f"last {blocks} block(s), lr x {job.config.backbone_lr_factor:g}"))
        if job.config.dataset:
            rows.append(("dataset", job.config.dataset))
    if job.state == "succeeded":
        rows.append(("epochs", f"{m.epochs_run} of {job.epochs} (best {m.best_epoch})"))
        rows.append(("train loss", f"{m.train_loss:.4f}"))
        if m.validation_examples:
            rows.append(("validation loss", f"{m.validation_loss:.4f} ({m.validation_examples} examples)"))
        if _has_accuracy(job):
            rows.append(("validation accuracy", f"{m.validation_accuracy:.3f}"))
        rows.append(("train seconds", f"{m.train_seconds:.1f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if not m.class_metrics:
        return 0
    print("\nper class (validation split):")
    _print_table(
        ("CLASS", "PRECISION", "RECALL", "SUPPORT"),
        [(c.label, f"{c.precision:.3f}", f"{c.recall:.3f}", str(c.support)) for c in m.class_metrics],
    )
    labels = [c.label for c in m.class_metrics]
    if len(labels) <= SHOWN_MATRIX_CLASSES:
        print("\nconfusion matrix (rows: actual class, columns: predicted):")
        matrix = m.confusion_matrix()
        _print_table(("", *labels), [(label, *map(str, row)) for label, row in zip(labels, matrix, strict=True)])
    else:
        wrong = sorted((c for c in m.confusion if c.actual != c.predicted), key=lambda c: -c.count)
        print(f"\nlargest confusions ({min(len(wrong), SHOWN_CONFUSIONS)} of {len(wrong)}; --json has them all):")
        _print_table(
            ("ACTUAL", "PREDICTED", "EXAMPLES"),
            [(labels[c.actual], labels[c.predicted], str(c.count)) for c in wrong[:SHOWN_CONFUSIONS]],
        )
    return 0


def cancel_command(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel_job(args.job_id)
    if args.json:
        _print_json(_job_json(job))
    elif job.done:
        print(f"job {job.id} {job.state}" + ("" if job.state == "cancelled" else " already: nothing to cancel"))
    else:
        print(f"job {job.id} cancelling: it stops at its next epoch")
    return 0


def delete_model_command(client: Client, args: argparse.Namespace) -> int:
    client.delete_model(args.name)
    print(f"deleted {args.name}")
    return 0


COMMANDS = {
    "classify": classify_command,
    "models": models_command,
    "health": health_command,
    "fine-tune": fine_tune_command,
    "jobs": jobs_command,
    "cancel": cancel_command,
    "delete-model": delete_model_command,
}


# -- progress -----------------------------------------------------------------------------


class Progress:
    """A job's events on ``stream``: a bar redrawn in place on a terminal, one line per event otherwise."""

    BAR_WIDTH = 20

    def __init__(self, stream: IO[str], *, interactive: bool | None = None) -> None:
        self._stream = stream
        self._interactive = stream.isatty() if interactive is None else interactive
        self._drawn = 0  # characters of the bar now on screen
        self.job_id: str | None = None

    def __call__(self, event: JobEvent) -> None:
        self.job_id = event.job_id
        text = describe_event(event)
        if not self._interactive:
            print(text, file=self._stream, flush=True)
            return
        done = round(self.BAR_WIDTH * min(max(event.progress, 0.0), 1.0))
        line = f"[{'#' * done}{'.' * (self.BAR_WIDTH - done)}] {event.progress:4.0%}  {text}"
        line = line[: max(20, shutil.get_terminal_size().columns - 1)]
        self._stream.write("\r" + line.ljust(self._drawn))
        self._drawn = len(line)
        if event.terminal:
            self.end()
        self._stream.flush()

    def end(self) -> None:
        """Move past the bar, if one is drawn."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = 0


def describe_event(event: JobEvent) -> str:
    if event.kind == "epoch":
        parts = [f"epoch {event.epoch}/{event.epochs}", f"loss {event.train_loss:.4f}"]
        if event.validation_loss:
            parts.append(f"val {event.validation_loss:.4f}")
        if event.validation_accuracy:
            parts.append(f"acc {event.validation_accuracy:.3f}")
        if event.epoch < event.epochs:
            parts.append(f"eta {_duration(event.eta_seconds)}")
        return "  ".join(parts)
    if event.kind == "queued":
        return f"job {event.job_id} queued"
    if event.terminal:
        return f"job {event.job_id} {event.state}" + (f": {event.message}" if event.message else "")
    return event.message or event.kind


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# -- output -----------------------------------------------------------------------------


def _prediction_json(rank: int, prediction: Prediction) -> dict[str, object]:
    return {"rank": rank, "label": prediction.label, "index": prediction.index, "score": prediction.score}


def _versions(model: ModelInfo) -> str:
    """A model's versions, the one served marked: ``1 2 3*``."""
    return " ".join(v + ("*" if v == model.version else "") for v in model.versions or (model.version,))


def _model_json(model: ModelInfo) -> dict[str, object]:
    return {
        "name": model.name,
        "state": model.state,
        "ready": model.ready,
        "reason": model.reason,
        "platform": model.platform,
        "base_model": model.base_model,
        "num_classes": model.num_classes,
        "input_size": model.input_size,
        "min_height": model.min_height,
        "min_width": model.min_width,
        "version": model.version,
        "versions": list(model.versions),
    }


def _has_accuracy(job: JobInfo) -> bool:
    return job.state == "succeeded" and job.loss == "cross_entropy" and job.metrics.validation_examples > 0


def _weights_json(weights: object) -> object:
    """A config's class weights as JSON: the mode, or an object of weights by class name."""
    return weights if isinstance(weights, str) else dict(weights)  # type: ignore[call-overload]


def _job_json(job: JobInfo) -> dict[str, object]:
    return {
        "job_id": job.id,
        "state": job.state,
        "error": job.error,
        "base_model": job.base_model,
        "output_model": job.output_model,
        "head": job.head,
        "optimizer": job.optimizer,
        "loss": job.loss,
        "epochs": job.epochs,
        "examples": job.examples,
        "labels": list(job.labels),
        "metrics": asdict(job.metrics),
        "augmentation": None if job.config is None else asdict(job.config.augmentation),
        "class_weights": None if job.config is None else _weights_json(job.config.class_weights),
        "dataset": None if job.config is None else job.config.dataset,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def _print_summary(result: FineTuneResult, plot: Path | None) -> None:
    job, m = result.job, result.metrics
    if result.succeeded:
        print(f"job {job.id} succeeded: {job.output_model} is served")
    else:
        print(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))
    rows = [
        ("base model", job.base_model),
        ("head", f"{job.head}, {job.optimizer}, {job.loss}"),
        ("classes" if job.loss == "cross_entropy" else "outputs", f"{len(job.labels)}: {' '.join(job.labels)}"),
        ("examples", str(job.examples)),
    ]
    if result.succeeded:
        rows.append(("epochs", f"{m.epochs_run} of {job.epochs} (best {m.best_epoch})"))
        rows.append(("train loss", f"{m.train_loss:.4f}"))
        if m.validation_examples:
            rows.append(("validation loss", f"{m.validation_loss:.4f} ({m.validation_examples} examples)"))
        if _has_accuracy(job):
            rows.append(("validation accuracy", f"{m.validation_accuracy:.3f}"))
    if plot is not None:
        rows.append(("plot", str(plot)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    # Leave out trailing columns that are empty in every row.
    while len(header) > 1 and not any(row[len(header) - 1] for row in rows):
        header = header[:-1]
    table = [tuple(header)] + [tuple(row[: len(header)]) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value
