"""The web console: a fixed set of static files from the package (``service/console/``), served
at ``/`` of the HTTP port. It is a client of the public REST API and nothing else.

- **A fixed file set**: :data:`FILES` names every file and its content type; they are read once,
  when the port starts, and any other path is 404. No path from a request reaches the file
  system, so there is nothing to traverse.
- **Headers**: a strict Content-Security-Policy (scripts, styles and connections from this origin
  only, no inline code, no frames, no plugins), ``X-Content-Type-Options: nosniff``, no referrer.
  The console sets no cookies and reads none: the token travels in the ``Authorization`` header,
  so a page elsewhere cannot borrow the user's rights (no CSRF).
- **Caching**: the names carry no hash, so every response says ``no-cache`` with a strong ETag:
  a browser revalidates, and an unchanged file costs a 304 with no body.

The page needs no authorization (it holds no data); what it fetches meets the API's own checks.

- **The server's rules, from their one definition**: the page's ``<html data-label-rule>`` is
  filled when the port starts with the rule for class names (``vision_client.protocol.labels``)
  and this server's ``--max-label-length``, so the console refuses a class name the server would
  refuse before it uploads anything, without restating the rule in JavaScript. The fine-tuning
  form's ``data-fine-tuning`` holds the fine-tuning vocabulary (``vision_client.protocol.vocabulary``:
  head kinds, layers, every default) and this server's head limits, from which the form is built.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from service.config import FineTuneLimits
from service.finetune.spec import MAX_HEAD_LAYERS
from service.inference.backbone_blocks import BLOCK_NAMES
from vision_client.protocol import vocabulary
from vision_client.protocol.labels import label_rule

CONSOLE_PACKAGE = "service"
CONSOLE_FOLDER = "console"
INDEX = "index.html"
FILE_PATH = "/console/{name}"
LABEL_RULE_SLOT = b'data-label-rule=""'  # in index.html; filled by load_console
FINE_TUNING_SLOT = b'data-fine-tuning=""'  # in index.html; filled by load_console

_JS = "text/javascript; charset=utf-8"
FILES: Mapping[str, str] = {
    INDEX: "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
    "main.js": _JS,
    "api.js": _JS,
    "dom.js": _JS,
    "labels.js": _JS,
    "charts.js": _JS,
    "zip.js": _JS,
    "models.js": _JS,
    "classify.js": _JS,
    "finetune.js": _JS,
    "jobs.js": _JS,
    "throughput.js": _JS,
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",  # previews of the user's own images (object URLs)
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True)
class ConsoleFile:
    body: bytes
    content_type: str
    etag: str


def load_console(limits: FineTuneLimits | None = None) -> dict[str, ConsoleFile]:
    """Every file of :data:`FILES` from the installed package, the page with this server's rules
    (:func:`fill_page`); a missing file is a broken install."""
    folder = resources.files(CONSOLE_PACKAGE) / CONSOLE_FOLDER
    files = {}
    for name, content_type in FILES.items():
        body = (folder / name).read_bytes()
        if name == INDEX:
            body = fill_page(body, limits or FineTuneLimits())
        files[name] = ConsoleFile(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return files


def fill_page(page: bytes, limits: FineTuneLimits) -> bytes:
    """The page with its ``data-label-rule`` attribute holding the rule for class names as JSON
    (escaped for an attribute value), for this server's label limit."""
    if page.count(LABEL_RULE_SLOT) != 1:
        raise RuntimeError(f"the console's {INDEX} must hold {LABEL_RULE_SLOT.decode()} once (a broken install?)")
    rule = html.escape(json.dumps(label_rule(limits.max_label_length), ensure_ascii=True), quote=True)
    page = page.replace(LABEL_RULE_SLOT, f'data-label-rule="{rule}"'.encode("ascii"))
    if page.count(FINE_TUNING_SLOT) != 1:
        raise RuntimeError(f"the console's {INDEX} must hold {FINE_TUNING_SLOT.decode()} once (a broken install?)")
    form = {
        **vocabulary(),
        "limits": {"max_layers": MAX_HEAD_LAYERS, "max_width": limits.max_hidden},
        "backbone_blocks": {name: list(names) for name, names in BLOCK_NAMES.items()},
    }
    settings = html.escape(json.dumps(form, ensure_ascii=True), quote=True)
    return page.replace(FINE_TUNING_SLOT, f'data-fine-tuning="{settings}"'.encode("ascii"))


def console_routes(
    files: Mapping[str, ConsoleFile] | None = None, *, limits: FineTuneLimits | None = None
) -> list[web.RouteDef]:
    """``GET /`` (the page) and ``GET /console/{name}`` (its scripts, styles and icon); ``limits``:
    the server's fine-tuning limits, whose label length the page's rule for class names carries."""
    served = dict(load_console(limits) if files is None else files)

    async def index(request: web.Request) -> web.StreamResponse:
        return _answer(request, served[INDEX])

    async def file(request: web.Request) -> web.StreamResponse:
        found = served.get(request.match_info["name"])
        if found is None:
            return web.Response(status=404, text="not found\n", headers=SECURITY_HEADERS)
        return _answer(request, found)

    return [web.get("/", index), web.get(FILE_PATH, file)]


def _answer(request: web.Request, found: ConsoleFile) -> web.Response:
    headers = {**SECURITY_HEADERS, "ETag": found.etag, "Cache-Control": "no-cache"}
    if found.etag in [tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers, "Content-Type": found.content_type})
