"""Every ``--option`` a message, log line or docstring names is an option that exists.

A person reads "over the limit (--max-something)" and types it: the name must be one the
command takes. The server's strings (``service/``) may name ``vision-serve``'s options (its one
option table); the SDK's (``vision_client``) ``vision-client``'s, or the
server's where it speaks of the server's limits. Where a string writes an option with a value and
the option has a fixed set of values, the value is one of them.
"""

from __future__ import annotations

import argparse
import ast
import http.client
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.config import RuntimeConfig, ServeConfig
from service.errors import InvalidInputError
from service.inference.preprocess import ImageDecoder, Preprocessing
from service.options import OPTIONS, build_serve_parser
from tests.conftest import ROOT, session_runtime_cache
from tests.tiny import TINY
from vision_client.cli import Defaults, build_parser

SERVICE = ROOT / "service"
SDK = ROOT / "clients" / "python" / "vision_client"
GENERATED = SDK / "protocol" / "stubs"
MESSAGE_BYTES = 100_000
TRANSFORM = Preprocessing(resize_size=32, crop_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(-\*)?(?:[ =]([a-z][a-z0-9_.:-]*[a-z0-9]))?")

# Names that are not our commands' options, each with where it comes from.
NOT_OURS = {
    "name": "the placeholder in docs/configuration.md's `--name` / `--no-name` for boolean options",
    "no-name": "the same placeholder",
}


@dataclass(frozen=True)
class Mention:
    path: Path
    line: int
    flag: str
    glob: bool
    value: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.flag}{'-*' if self.glob else ''} in {self.text!r}"


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= flags(sub)
    return found


SERVE_FLAGS = flags(build_serve_parser({}))  # fetch-weights takes --models, one of these
CLIENT_FLAGS = flags(build_parser(Defaults.from_env({})))
CHOICES = {option.flag: option.choices for option in OPTIONS if option.choices is not None}


def strings(path: Path) -> Iterator[tuple[int, str]]:
    """The string literals of a module (docstrings and the literal parts of f-strings included)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def mentions(root: Path) -> Iterator[Mention]:
    for path in sorted(root.rglob("*.py")):
        if path.is_relative_to(GENERATED):
            continue
        for line, text in strings(path):
            for match in OPTION.finditer(text):
                excerpt = text[max(0, match.start() - 50) : match.end() + 30]
                yield Mention(path, line, "--" + match.group(1), bool(match.group(2)), match.group(3), excerpt)


def unknown(mention: Mention, known: set[str]) -> str | None:
    """Why ``mention`` names no option of ``known``, or None."""
    if mention.flag[2:] in NOT_OURS:
        return None
    if mention.glob:
        if any(flag.startswith(mention.flag + "-") for flag in known):
            return None
        return "no option matches"
    if mention.flag not in known:
        return "no such option"
    choices = CHOICES.get(mention.flag)
    if choices is not None and mention.value is not None and mention.value not in choices:
        return f"{mention.value!r} is not one of its values ({', '.join(choices)})"
    return None


SERVICE_MENTIONS = list(mentions(SERVICE))
SDK_MENTIONS = list(mentions(SDK))


def test_the_scan_finds_the_options_messages_name() -> None:
    named = {m.flag for m in SERVICE_MENTIONS}
    assert {"--max-request-images", "--max-message-bytes", "--model-store", "--weights"} <= named
    assert {"--tls-ca", "--allow-insecure-token", "--plot"} <= {m.flag for m in SDK_MENTIONS}


def test_the_servers_strings_name_its_own_options() -> None:
    problems = [f"{m}: {why}" for m in SERVICE_MENTIONS if (why := unknown(m, SERVE_FLAGS))]
    assert not problems, "strings naming options vision-serve does not have:\n" + "\n".join(problems)


def test_the_sdks_strings_name_options_of_the_cli_or_the_server() -> None:
    problems = [f"{m}: {why}" for m in SDK_MENTIONS if (why := unknown(m, CLIENT_FLAGS | SERVE_FLAGS))]
    assert not problems, "strings naming options neither command has:\n" + "\n".join(problems)


def test_the_allow_list_is_still_needed() -> None:
    """An entry of NOT_OURS that no string uses any more goes."""
    used = {m.flag[2:] for m in SERVICE_MENTIONS + SDK_MENTIONS}
    assert set(NOT_OURS) <= used, set(NOT_OURS) - used


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("over the limit (--max-request-images); split it", None),
        ("over the limit (--max-requests-images); split it", "no such option"),
        ("--runtime openvino: not installed; use --runtime onnxruntime", None),
        ("use --runtime tensorrt", "'tensorrt' is not one of its values"),
        ("HTTPS with the gRPC port's --tls-* files", None),
        ("the --mtls-* files", "no option matches"),
        ("pip install 'matplotlib>=3.8' -- then retry", None),
    ],
)
def test_the_rule_on_examples(tmp_path: Path, text: str, why: str | None) -> None:
    module = tmp_path / "module.py"
    module.write_text(f"MESSAGE = f{text!r}\n", encoding="utf-8")
    reasons = [unknown(m, SERVE_FLAGS) for m in mentions(tmp_path)]
    if why is None:
        assert reasons in ([], [None], [None, None]), reasons
    else:
        assert any(r is not None and r.startswith(why) for r in reasons), reasons


# -- a limit's message names the limit that applied ---------------------------------------------


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_within_max_image_pixels_is_not_refused_by_pillows_own_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses images over its MAX_IMAGE_PIXELS before our check runs: with a larger
    --max-image-pixels, an image between the two was refused in the name of our limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # a Pillow stricter than the option
    decoder = ImageDecoder(TRANSFORM, max_pixels=10_000)
    assert decoder(_png(50, 50)).shape == (3, 32, 32)  # 2,500 pixels: within --max-image-pixels
    with pytest.raises(InvalidInputError, match=r"over the limit of 10000 \(--max-image-pixels"):
        decoder(_png(200, 200))


def test_a_stricter_option_keeps_pillows_guard_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    ImageDecoder(TRANSFORM, max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server of the tiny model whose messages may be 100,000 bytes (more than a config part may)."""
    from tests.inprocess import InProcessServer

    config = ServeConfig(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        model_store=tmp_path_factory.mktemp("store"),
        max_message_bytes=MESSAGE_BYTES,
    )
    with InProcessServer(config) as server:
        yield server


def _upload(server: Any, config: bytes, image: bytes) -> tuple[int, str]:
    boundary = "limit-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="config"\r\n\r\n'.encode()
        + config
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="cat"; filename="0.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    try:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        connection.request("POST", "/v1/jobs", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        connection.close()


def test_an_uploads_parts_name_the_limit_each_is_held_to(tiny_server: Any) -> None:
    """The config part has a fixed bound of its own (64 KiB), an image part --max-message-bytes:
    a long config was refused in the name of --max-message-bytes, which does not bound it."""
    config = json.dumps({"baseModel": TINY, "outputModel": "limits", "epochs": 1}).encode()
    long_config = config[:-1] + b', "seed": "' + b"1" * 70_000 + b'"}'
    assert len(long_config) < MESSAGE_BYTES
    status, error = _upload(tiny_server, long_config, _png(8, 8))
    assert status == 400 and "part 'config' is over 65536 bytes" in error and "--max-message-bytes" not in error, error
    big_image = _png(8, 8) + b"\0" * MESSAGE_BYTES  # bytes after the PNG's end: only its size matters here
    status, error = _upload(tiny_server, config, big_image)
    assert status == 400 and f"is over {MESSAGE_BYTES} bytes (--max-message-bytes)" in error, error
