"""``vision-serve``: run the server, or ``vision-serve fetch-weights`` to pre-seed weights.

The options themselves, their ``VISION_SERVE_<OPTION>`` variables and their defaults are one table
in :mod:`service.options`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from service.config import DEFAULT_MODELS
from service.errors import VisionServeError
from service.host.memory import configure_allocator
from service.options import ENV_PREFIX, build_serve_parser, config_from_args, model_list
from service.telemetry.logs import configure_logging

__all__ = ["build_serve_parser", "config_from_args", "fetch_weights", "main"]


def fetch_weights(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vision-serve fetch-weights",
        description="Download pretrained weights into torch's cache (TORCH_HOME) ahead of serving.",
    )
    parser.add_argument(
        "--models",
        type=model_list,
        default=environ.get(ENV_PREFIX + "MODELS", ",".join(DEFAULT_MODELS)),
        help="comma-separated models (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    from service.models import fetch_pretrained, get_model_spec
    from service.models.weights import ensure_pretrained

    specs = [get_model_spec(name) for name in args.models]
    ensure_pretrained(specs, progress=True)  # all downloads first: a failure names every model left
    for spec in specs:
        print(f"{spec.name}: {fetch_pretrained(spec)}")  # loads each once: a corrupt file is found here
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ
    try:
        if argv[:1] == ["fetch-weights"]:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            return fetch_weights(argv[1:], environ)
        config = config_from_args(build_serve_parser(environ).parse_args(argv))
        configure_logging(config.log_level, config.log_format)
        configure_allocator()  # before any model is loaded: see service.host.memory
        if config.frontend_count > 1:
            from service.supervisor.supervisor import supervise

            return asyncio.run(supervise(config, argv))
        from service.engine.server import serve

        return asyncio.run(serve(config))
    except VisionServeError as exc:
        print(f"vision-serve: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
