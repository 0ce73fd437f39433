"""Who may import what: the server uses the SDK's public protocol only, ``bench/`` stands on the
installed packages and the harness it shares with the tests (``tests/support/``; nothing else of
``tests``, nothing private, no ``sys.path`` edits), the package ships no test support, and the
layers of ``service/`` import downwards only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
    return modules


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def is_private(module: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in module.split("."))


def test_the_server_imports_only_public_names_of_the_sdk() -> None:
    private = {
        str(path.relative_to(ROOT)): found
        for path in sources("service")
        if (found := [m for m in imported_modules(path) if m.startswith("vision_client") and is_private(m)])
    }
    assert not private, f"private SDK modules imported: {private}"


def test_bench_stands_on_the_installed_packages() -> None:
    ours = ("service", "vision_client", "bench")
    problems = []
    for path in sources("bench"):
        modules = imported_modules(path)
        if [m for m in modules if (m == "tests" or m.startswith("tests.")) and not m.startswith("tests.support")]:
            problems.append(f"{path.name} imports tests/ beyond the support both share (tests/support/)")
        if [m for m in modules if m.split(".")[0] in ours and is_private(m)]:
            problems.append(f"{path.name} imports private names")
        if "sys.path" in path.read_text(encoding="utf-8"):
            problems.append(f"{path.name} edits sys.path")
    assert not problems


def test_test_support_is_not_shipped() -> None:
    """The harness tests and bench/ share (tests/support/: server processes, moto) is no module of
    the package: nothing in service/ imports tests/, and the wheel's packages (pyproject's
    ``packages.find``) are service's alone."""
    import tomllib
    from setuptools import find_packages

    importing = [
        str(path.relative_to(ROOT))
        for path in sources("service")
        if any(m == "tests" or m.startswith("tests.") for m in imported_modules(path))
    ]
    assert not importing, f"service/ imports tests/: {importing}"
    find = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    shipped = find_packages(str(ROOT), include=find["find"]["include"])
    assert "service" in shipped and all(name.split(".")[0] == "service" for name in shipped), shipped
    assert not (ROOT / "service" / "testing.py").exists()


# service/'s layers, top to bottom: a module imports from its own layer and the ones below only. The
# folders show them: the processes (supervisor/, frontend/, engine/'s entry, assembly and hop end),
# the engine's core (engine/, with models/ and runtimes/), and below it what every process shares
# without torch (inference/, host/, telemetry/, storage/, config, errors).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "entry points and processes",
        (
            "service.__main__",
            "service.cli",
            "service.options",
            "service.supervisor",
            "service.frontend",
            "service.engine.__main__",
            "service.engine.server",
            "service.engine.hop_server",
        ),
    ),
    ("transport", ("service.transport",)),
    ("model control and fine-tuning", ("service.engine.model_control", "service.finetune")),
    ("engine", ("service.engine", "service.models", "service.runtimes")),
    (
        "shared by every process",
        (
            "service.inference",
            "service.host",
            "service.telemetry",
            "service.storage",
            "service.config",
            "service.errors",
        ),
    ),
]
# the package itself (its __init__: the version), below everything
PACKAGE = "service"
# what stays at the top of service/: the entry points and what every layer uses; every other module
# lives in the folder of its layer
TOP_LEVEL = {"__init__", "__main__", "cli", "config", "errors", "options"}


def layer_of(module: str) -> int:
    if module == PACKAGE:
        return len(LAYERS) - 1
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_service_imports_run_downwards_only() -> None:
    problems = []
    for path in sources("service"):
        own = layer_of(module_name(path))
        upwards = sorted({m for m in imported_modules(path) if m.split(".")[0] == "service" and layer_of(m) < own})
        if upwards:
            problems.append(f"{module_name(path)} ({LAYERS[own][0]}) imports from above: {upwards}")
    assert not problems


def test_decoding_imports_no_torch() -> None:
    """Processes that never import torch decode IMAGE inputs: ``service.inference.preprocess`` (decoding and
    the models' exact preprocessing) stands on Pillow and numpy only. A fresh interpreter, since
    this one has imported torch long ago."""
    probe = (
        "import sys, service.inference.preprocess; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"service.inference.preprocess imports {result.stdout.strip()}"


# the engine's own folders: only the engine process (or the single process) loads them
ENGINE_FOLDERS = ("service.engine", "service.models", "service.runtimes")
HEAVY = ("torch", "torchvision", "onnxruntime", "openvino")


def test_only_entry_points_and_what_every_layer_uses_stay_at_the_top() -> None:
    flat = {path.stem for path in (ROOT / "service").glob("*.py")}
    assert not flat - TOP_LEVEL, f"{sorted(flat - TOP_LEVEL)}: move each into the folder of its layer"


def test_frontends_import_nothing_of_the_engine() -> None:
    """Protocol front ends (``service/frontend/``) and the supervisor load neither torch nor a
    runtime nor any module of the engine's folders: each costs a few tens of megabytes and starts at
    once, however many a node runs. A fresh interpreter imports every module of both packages and
    parses the options as a front end does; and no module of theirs names the engine's folders, not
    even in a function."""
    probe = (
        "import importlib, pkgutil, sys, service.frontend, service.supervisor, service.cli\n"
        "for package in (service.frontend, service.supervisor):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "from service.options import build_serve_parser, config_from_args\n"
        "config_from_args(build_serve_parser({}).parse_args(['--frontends', '2']))\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith({ENGINE_FOLDERS!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"a front end or the supervisor imports {result.stdout.strip()}"
    named = {
        str(path.relative_to(ROOT)): found
        for path in sources("service/frontend") + sources("service/supervisor")
        if (found := [m for m in imported_modules(path) if m.startswith(ENGINE_FOLDERS)])
    }
    assert not named, f"front end or supervisor modules that import the engine's: {named}"
