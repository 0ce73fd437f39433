"""``python -m service.engine RUN_DIR INDEX SUPERVISOR_PID -- [vision-serve options]``: the engine, started by
the supervisor (``service.supervisor.supervisor``), never by hand."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from service.config import ServeConfig
from service.errors import VisionServeError
from service.host.memory import configure_allocator
from service.options import build_serve_parser, config_from_args
from service.supervisor.supervisor import LOADED_MARK, STARTED_MARK, die_with_supervisor
from service.telemetry.logs import configure_logging


async def run_engine(config: ServeConfig, run_dir: Path) -> int:
    from service.engine.server import VisionServer

    server = VisionServer(config, run_dir=run_dir)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    (run_dir / STARTED_MARK).touch()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    try:
        await server.wait_loaded()
    except Exception:
        await server.request_stop()
        return 1
    (run_dir / LOADED_MARK).touch()
    await server.wait_for_termination()
    await server.request_stop()
    return 0


def main(argv: list[str]) -> int:
    run_dir, _, supervisor, _, *serve_argv = argv
    die_with_supervisor(int(supervisor))
    config = config_from_args(build_serve_parser(os.environ).parse_args(serve_argv))
    configure_logging(config.log_level, config.log_format)
    configure_allocator()
    try:
        return asyncio.run(run_engine(config, Path(run_dir)))
    except VisionServeError as exc:
        print(f"vision-serve: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
