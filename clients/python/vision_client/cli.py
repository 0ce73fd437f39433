"""``vision-client``: classify images, list models and check health from a shell.

    vision-client [--target HOST:PORT] [--token TOKEN] [--timeout S] [--tls] COMMAND

    vision-client classify IMAGE... [--model M] [--top-k K] [--json]
    vision-client models [--json]
    vision-client health [--json]

The target defaults to ``$VISION_CLIENT_TARGET`` or ``localhost:8001`` and the
token to ``$VISION_CLIENT_TOKEN``. Errors print ``vision-client: error: ...``
and exit 1; ``health`` exits 1 when the server is not ready.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vision_client._client import DEFAULT_MODEL, DEFAULT_TIMEOUT, Client
from vision_client._types import ModelInfo, Prediction
from vision_client._version import __version__
from vision_client.errors import UnavailableError, VisionClientError

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
    parser = argparse.ArgumentParser(prog=PROG, description="Client of vision-serving (gRPC image classification).")
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

    models = commands.add_parser("models", parents=[connection], help="list the server's models")
    models.add_argument("--json", action="store_true", help="print JSON")

    health = commands.add_parser(
        "health", parents=[connection], help="server and model readiness (exit 1 if not ready)"
    )
    health.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _add_connection_options(parser: argparse.ArgumentParser, defaults: Defaults | None) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if defaults is None else value

    parser.add_argument(
        "--target",
        default=default(defaults.target if defaults else None),
        help=f"server address, host:port or dns:///name:port (env VISION_CLIENT_TARGET; default {DEFAULT_TARGET})",
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
    parser.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(Defaults.from_env(os.environ)).parse_args(argv)
    try:
        with Client(args.target, timeout=args.timeout, token=args.token, tls=args.tls) as client:
            return COMMANDS[args.command](client, args)
    except UnavailableError as error:
        return _fail(f"{error} (target {args.target})")
    except VisionClientError as error:
        return _fail(str(error))
    except OSError as error:  # an image file that cannot be read
        return _fail(f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


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
    models = client.models(labels=False)
    if args.json:
        _print_json([_model_json(m) for m in models])
        return 0
    header = ("NAME", "STATE", "CLASSES", "INPUT", "BASE MODEL", "REASON")
    rows = [
        (m.name, m.state, str(m.num_classes), f"{m.input_size}x{m.input_size}", m.base_model or "-", m.reason)
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


COMMANDS = {"classify": classify_command, "models": models_command, "health": health_command}


# -- output -----------------------------------------------------------------------------


def _prediction_json(rank: int, prediction: Prediction) -> dict[str, object]:
    return {"rank": rank, "label": prediction.label, "index": prediction.index, "score": prediction.score}


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
    }


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
