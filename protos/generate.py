"""Generate the Python stubs of `protos/` into the client SDK, their one home.

Run with `make protos` (needs grpcio-tools < 1.82 for protobuf 6.x gencode).

The generated modules register their descriptors in a private descriptor pool
(`vision_client.protocol.stubs._pool.POOL`) instead of protobuf's default pool. Our
`inference` package has the same message names as Triton's, so with the
default pool a process importing both `tritonclient.grpc` and our stubs would
fail with "duplicate symbol 'inference.ModelInferRequest'". The wire format is
unaffected: only the in-process registry differs.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_PACKAGE = "vision_client.protocol.stubs"
OUT_DIR = ROOT / "clients" / "python" / "vision_client" / "protocol" / "stubs"

POOL_MODULE = '''"""The descriptor pool that holds every message of our protos (see protos/generate.py)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def rewrite(path: Path, packages: set[str]) -> None:
    """Point a generated module at the private pool and at absolute imports."""
    text = path.read_text()
    if "_descriptor_pool.Default()" in text:
        text = text.replace("_descriptor_pool.Default()", "_POOL").replace(
            "from google.protobuf.internal import builder as _builder\n",
            "from google.protobuf.internal import builder as _builder\n"
            f"from {OUT_PACKAGE}._pool import POOL as _POOL\n",
        )
    for package in packages:
        text = re.sub(
            rf"^from {re.escape(package)} import ",
            f"from {OUT_PACKAGE}.{package} import ",
            text,
            flags=re.MULTILINE,
        )
    path.write_text(text)


def generate(out_dir: Path = OUT_DIR) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    packages = {str(Path(f).parent).replace("/", ".") for f in files}
    (out_dir / "__init__.py").write_text('"""Generated stubs of protos/. Do not edit: run `make protos`."""\n')
    (out_dir / "_pool.py").write_text(POOL_MODULE)
    for directory in sorted(d for d in out_dir.rglob("*") if d.is_dir()):
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    for module in out_dir.rglob("*.py"):
        rewrite(module, packages)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
