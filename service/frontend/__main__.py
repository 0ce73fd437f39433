"""``python -m service.frontend RUN_DIR INDEX SUPERVISOR_PID -- [vision-serve options]``: one protocol front end,
started by the supervisor (``service.supervisor.supervisor``), never by hand."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from service.errors import VisionServeError
from service.frontend.server import serve_frontend
from service.options import build_serve_parser, config_from_args
from service.supervisor.supervisor import die_with_supervisor
from service.telemetry.logs import configure_logging


def main(argv: list[str]) -> int:
    run_dir, index, supervisor, _, *serve_argv = argv
    die_with_supervisor(int(supervisor))
    config = config_from_args(build_serve_parser(os.environ).parse_args(serve_argv))
    configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(serve_frontend(config, Path(run_dir), int(index)))
    except VisionServeError as exc:
        print(f"vision-serve: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
