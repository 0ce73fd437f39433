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


# service/'s layers, top to bottom: a module imports from its own layer and the ones below only.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "entry points and processes",
        (
            "service.cli",
            "service.__main__",
            "service.options",
            "service.engine.server",
            "service.supervisor.supervisor",
            "service.engine",
            "service.frontend",
        ),
    ),
    ("transport", ("service.transport",)),
    ("model control and fine-tuning", ("service.engine.model_control", "service.finetune")),
    ("core", ("service",)),  # data plane, registry, loaders, batching, runtimes, models, metrics, files...
]


def layer_of(module: str) -> int:
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


def test_frontends_import_no_torch_and_no_runtime() -> None:
    """Protocol front ends (``service.frontend``) and the supervisor load neither torch nor a runtime:
    each costs a few tens of megabytes and starts at once, however many a node runs. A fresh
    interpreter, importing what ``python -m service.frontend`` does and parsing the options."""
    probe = (
        "import sys, service.frontend.__main__, service.supervisor.supervisor, service.cli; "
        "from service.options import build_serve_parser, config_from_args; "
        "config_from_args(build_serve_parser({}).parse_args(['--frontends', '2'])); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'torchvision', 'onnxruntime', 'openvino'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"a front end imports {result.stdout.strip()}"
