"""A test run writes nothing under the user's home: tests/conftest.py gives every run a home of
its own. This runs tests that start real servers (ONNX Runtime exports, a model store, the
weights directory) in a child pytest with a fresh, empty HOME, and lists it afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import HOME_ENV, ROOT, TEST_HOME_ENV

SAMPLE = [
    "tests/test_bounded_reads.py::test_rpcs_keep_answering_while_the_token_file_is_a_fifo",
    "tests/test_bounded_reads.py::test_a_weights_file_may_be_a_symlink",
    "tests/test_health_watch.py::test_unknown_service_is_watched_as_service_unknown_and_check_says_not_found",
]


def test_a_test_run_writes_nothing_under_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in (*HOME_ENV, TEST_HOME_ENV)}
    env["HOME"] = str(home)
    env.pop("VISION_SERVE_RUNTIME_CACHE", None)  # the child makes its own, as a fresh run does
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *SAMPLE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "3 passed" in run.stdout
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
