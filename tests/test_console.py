"""The web console (``service/console/``, served by ``service/transport/rest/console.py``).

Without a browser: the static handler's headers, its fixed file set, and the files' rules (no
inline code, no HTML built from strings). In headless Chromium, driven by Debian's
chromium-driver through Selenium, against an in-process server that wants a token for
management: every view, a classification equal to the SDK's, a 3-class fine-tuning job to the
end with one chart point per epoch, the new model tried in place, a class name that is HTML
shown as text, and the refusal of a job sent without the token. The browser tests save a
screenshot of each view: under the test's temporary folder, or in the folder that
``CONSOLE_SCREENSHOTS`` names (``make screenshots`` sets it to ``docs/console/``, which the README
shows).
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import os
import re
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from PIL import Image

from service.config import FineTuneLimits
from service.transport.rest.console import CONSOLE_FOLDER, FILES, INDEX, console_routes, fill_page
from tests.conftest import ROOT, TOKEN, encode
from tests.store_util import save_head
from tests.support.finetune_data import digits
from tests.test_finetune_limits import ALLOWED_LABELS, REFUSED_LABELS
from vision_client.protocol.labels import label_problem, label_rule

CONSOLE = ROOT / "service" / CONSOLE_FOLDER
XSS = "<img src=x onerror=alert(1)>"


# -- the static handler, without a browser ------------------------------------------------------------


def fetch(path: str, headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    """``GET path`` from an app that serves the console's routes only."""

    async def run() -> tuple[int, CIMultiDict[str], bytes]:
        app = web.Application()
        app.add_routes(console_routes())
        async with TestClient(TestServer(app)) as client:
            response = await client.get(path, headers=headers or {}, allow_redirects=False)
            return response.status, CIMultiDict(response.headers), await response.read()

    return asyncio.run(run())


def test_the_page_and_its_files_come_with_a_strict_policy() -> None:
    status, headers, body = fetch("/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/console/main.js">' in body
    policy = {part.split()[0]: part.split()[1:] for part in headers["Content-Security-Policy"].split("; ")}
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"]
    assert not [source for sources in policy.values() for source in sources if "unsafe" in source]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert "Set-Cookie" not in headers
    for name, content_type in FILES.items():
        status, headers, body = fetch(f"/console/{name}")
        assert status == 200, name
        assert headers["Content-Type"] == content_type
        assert headers["Cache-Control"] == "no-cache" and headers["ETag"]
        assert "Content-Security-Policy" in headers and headers["X-Content-Type-Options"] == "nosniff"
        file = (CONSOLE / name).read_bytes()
        assert body == (fill_page(file, FineTuneLimits()) if name == INDEX else file)


def label_rule_of(page: bytes) -> object:
    found = re.search(rb'<html lang="en" data-label-rule="([^"]*)">', page)
    assert found, page[:200]
    return json.loads(html.unescape(found.group(1).decode("ascii")))


def test_the_page_carries_the_servers_rule_for_class_names() -> None:
    """The rule's parameters come from its one definition and the server's own limit, in an
    attribute the page's scripts read: nothing is restated in JavaScript."""
    _, _, body = fetch("/")
    assert label_rule_of(body) == label_rule(FineTuneLimits().max_label_length)

    async def run() -> bytes:
        app = web.Application()
        app.add_routes(console_routes(limits=FineTuneLimits(max_label_length=8)))
        async with TestClient(TestServer(app)) as client:
            return await (await client.get("/")).read()

    rule = label_rule_of(asyncio.run(run()))
    assert isinstance(rule, dict) and rule["maxBytes"] == 8
    assert b"data-label-rule" in (CONSOLE / INDEX).read_bytes()
    labels_js = (CONSOLE / "labels.js").read_text(encoding="utf-8")
    assert "128" not in labels_js and "202E" not in labels_js.upper(), "labels.js restates the rule"


def test_an_unchanged_file_is_answered_not_modified() -> None:
    _, headers, _ = fetch("/console/main.js")
    status, again, body = fetch("/console/main.js", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b"" and again["ETag"] == headers["ETag"]
    status, _, body = fetch("/console/main.js", {"If-None-Match": '"other"'})
    assert status == 200 and body


@pytest.mark.parametrize(
    "path",
    [
        "/console/nothing.js",
        "/console/../transport/rest/console.py",
        "/console/..%2F..%2Fserver.py",
        "/console/%2e%2e%2f%2e%2e%2fserver.py",
        "/console/..%5C..%5Cserver.py",
        "/console/.%2Fmain.js",
        "/console/main.js%00.png",
        "/console/",
        "/console",
        "/index.html",
        "/etc/passwd",
        "/console/__init__.py",
    ],
)
def test_only_the_listed_files_are_served(path: str) -> None:
    status, _, body = fetch(path)
    assert status == 404, (path, status)
    assert b"import" not in body and b"def " not in body


def test_the_file_list_is_the_folder_and_the_wheel_ships_it() -> None:
    """Every file of the folder is served, every served file is in the folder, and the folder is
    package data (an installed wheel has it)."""
    assert sorted(FILES) == sorted(path.name for path in CONSOLE.iterdir())
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'service = ["{CONSOLE_FOLDER}/*"]' in pyproject


def test_the_page_holds_no_inline_code_and_builds_no_html_from_strings() -> None:
    page = (CONSOLE / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "an inline script"
    assert "<style" not in page and " style=" not in page, "an inline style"
    assert not re.search(r"\son[a-z]+=", page), "an inline event handler"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "a resource from elsewhere"
    for script in CONSOLE.glob("*.js"):
        text = script.read_text(encoding="utf-8")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{script.name} uses {sink}"
        assert not re.search(r"""import[^;]*from\s+["'](https?:)?//""", text), f"{script.name} imports from elsewhere"
        assert 'setAttribute("style"' not in text and "document.cookie" not in text, script.name


# -- in a browser ------------------------------------------------------------------------------------

WAIT_S = 60.0
JOB_WAIT_S = float(os.environ.get("CONSOLE_JOB_WAIT_S", "300"))


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[Any]:
    """An in-process AlexNet server with a model store that wants ``Bearer TOKEN`` for management."""
    from tests.client_util import token_server

    with token_server(tmp_path_factory.mktemp("console"), weights_dir) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, system_tool: Any) -> Iterator[Any]:
    """Headless Chromium through Debian's chromium-driver. Its profile, crash dumps, caches and
    home are all under the test's temporary folder: nothing is written under the user's home."""
    chromium = system_tool("chromium")
    chromedriver = system_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("chromium")
    home = folder / "home"
    for sub in ("profile", "crashes", "home/.config", "home/.cache"):
        (folder / sub).mkdir(parents=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--password-store=basic",
        "--lang=en-US",
        "--window-size=1280,800",
        f"--user-data-dir={folder / 'profile'}",
        f"--crash-dumps-dir={folder / 'crashes'}",
        f"--disk-cache-dir={folder / 'profile' / 'cache'}",
    ):
        options.add_argument(argument)
    environment = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "SE_AVOID_STATS": "true",
    }
    service = Service(executable_path=chromedriver, log_output=str(folder / "chromedriver.log"), env=environment)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_window_size(1280, 800)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The console in the browser, with waits for what a person would wait for."""

    def __init__(self, driver: Any, server: Any, screenshots: Path) -> None:
        self.driver = driver
        self.url = server.http_url
        self.screenshots = screenshots

    def open(self, view: str) -> None:
        """Loads the console afresh (a URL that differs only in its fragment would not reload it)."""
        self.driver.get("about:blank")
        self.driver.get(f"{self.url}/#{view}")
        self.wait(lambda d: d.find_element("id", f"view-{view}").is_displayed())
        self.driver.execute_script("window.alerts = []; window.alert = (m) => window.alerts.push(String(m));")

    def go(self, view: str) -> None:
        self.driver.find_element("id", f"nav-{view}").click()
        self.wait(lambda d: d.find_element("id", f"view-{view}").is_displayed())

    def wait(self, condition: Any, timeout: float = WAIT_S) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(condition)

    def find(self, css: str) -> Any:
        return self.driver.find_element("css selector", css)

    def all(self, css: str) -> list[Any]:
        return self.driver.find_elements("css selector", css)

    def text(self, element_id: str) -> str:
        return str(self.driver.find_element("id", element_id).text)

    def type(self, element_id: str, value: str) -> None:
        element = self.driver.find_element("id", element_id)
        element.clear()
        element.send_keys(value)

    def upload(self, element_id: str, *paths: Path) -> None:
        self.driver.find_element("id", element_id).send_keys("\n".join(str(p) for p in paths))

    def set_token(self, token: str) -> None:
        if token:
            self.type("token", token)
            self.find("#token-form button[type=submit]").click()
        else:
            self.find("#token-forget").click()

    def wait_for_job(self) -> None:
        """Until the fine-tuning job the page started has ended, one way or another."""
        ended = ("succeeded", "failed", "cancelled", "Refused", "Failed")
        try:
            self.wait(lambda d: any(word in d.find_element("id", "ft-status").text for word in ended), JOB_WAIT_S)
        except Exception as error:
            raise AssertionError(f"the job did not end: {self.text('ft-job')}: {self.text('ft-status')}") from error

    def no_alert(self) -> None:
        from selenium.common.exceptions import NoAlertPresentException

        with pytest.raises(NoAlertPresentException):
            _ = self.driver.switch_to.alert.text
        assert self.driver.execute_script("return window.alerts") == []

    def screenshot(self, name: str) -> None:
        self.screenshots.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(self.screenshots / f"{name}.png"))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests save their screenshots: ``CONSOLE_SCREENSHOTS`` (relative to the
    project) when set, so that the ones in the docs come from a test run, else a temporary folder,
    so that a plain test run leaves the working tree as it found it."""
    chosen = os.environ.get("CONSOLE_SCREENSHOTS")
    return ROOT / chosen if chosen else tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def page(browser: Any, console_server: Any, screenshots: Path) -> Iterator[Page]:
    browser.set_window_size(1280, 800)
    yield Page(browser, console_server, screenshots)
    browser.execute_script("sessionStorage.clear()")


def cell(element: Any, css: str) -> str:
    return str(element.find_element("css selector", css).text)


def images_of(folder: Path, classes: dict[str, list[bytes]]) -> dict[str, list[Path]]:
    paths: dict[str, list[Path]] = {}
    for index, (label, images) in enumerate(classes.items()):
        (folder / f"class{index}").mkdir(parents=True)
        paths[label] = []
        for number, image in enumerate(images):
            path = folder / f"class{index}" / f"{number:03d}.png"
            path.write_bytes(image)
            paths[label].append(path)
    return paths


def digit_images(per_class: int, classes: tuple[int, ...] = (0, 1, 2)) -> dict[str, list[bytes]]:
    images, targets = digits()
    return {str(c): [images[i] for i in range(len(images)) if targets[i] == c][:per_class] for c in classes}


def test_the_server_serves_the_console_at_the_root_of_its_http_port(console_server: Any) -> None:
    """The real server's HTTP port (with a token file) serves the page without a token, with its
    policy, beside the API."""
    with urllib.request.urlopen(f"{console_server.http_url}/", timeout=30) as response:
        assert response.status == 200 and b"vision-serving console" in response.read()
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    with urllib.request.urlopen(f"{console_server.http_url}/console/main.js", timeout=30) as response:
        assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"


def test_the_models_view_lists_the_served_model(page: Page) -> None:
    page.open("models")
    page.wait(lambda d: "READY" in d.find_element("id", "models-body").text)
    row = page.find("#models-body tr")
    cells = [cell.text for cell in row.find_elements("css selector", "th, td")]
    assert cells[:3] == ["alexnet", "READY", "1"]
    assert cells[4] == "cpu" and cells[5] == "1000"
    assert row.find_element("css selector", "button").text == "Unload"
    page.no_alert()
    page.screenshot("models")


def test_classify_shows_the_sdks_top_5(page: Page, console_server: Any, tmp_path: Path) -> None:
    from vision_client import Client

    photo = Image.linear_gradient("L").convert("RGB").resize((300, 200)).rotate(30)
    path = tmp_path / "gradient.jpg"
    path.write_bytes(encode(photo, "JPEG", quality=90))
    with Client(console_server.target) as client:
        (expected,) = client.classify(path.read_bytes(), model="alexnet", top_k=5)
    page.open("classify")
    page.wait(lambda d: d.find_element("id", "classify-model").get_attribute("value") == "alexnet")
    page.upload("classify-files", path)
    page.wait(lambda d: len(d.find_elements("css selector", "#classify-results .bars li")) == 5)
    rows = page.all("#classify-results .bars li")
    shown = [(cell(row, ".bar-label"), cell(row, ".score")) for row in rows]
    assert [label for label, _ in shown] == [p.label for p in expected]
    assert [float(score) for _, score in shown] == pytest.approx([p.score for p in expected], rel=5e-3)
    assert [int(r.get_attribute("data-index")) for r in rows] == [p.index for p in expected]
    meta = page.find("#classify-results .result-meta").text
    assert re.fullmatch(r"alexnet version 1 · \d+ ms", meta), meta
    page.no_alert()
    page.screenshot("classify")


def test_a_job_without_the_token_shows_the_refusal(page: Page, tmp_path: Path) -> None:
    paths = images_of(tmp_path, digit_images(3, (0, 1)))
    page.open("finetune")
    page.set_token("")
    for label, files in paths.items():
        page.type("ft-class-name", label)
        page.upload("ft-class-files", *files)
    page.type("ft-output", "refused")
    page.find("#ft-start").click()
    page.wait(lambda d: "Refused" in d.find_element("id", "ft-status").text)
    status = page.text("ft-status")
    assert status.startswith("Refused (401 Unauthenticated), this needs the access token"), status
    assert page.find("#ft-status").get_attribute("data-kind") == "error"
    page.no_alert()


def test_fine_tune_from_a_zip_to_the_end_and_try_the_new_model(page: Page, tmp_path: Path) -> None:
    epochs = 4
    classes = digit_images(20)
    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for label, images in classes.items():
            for number, image in enumerate(images):
                zipped.writestr(f"digits/{label}/{number:03d}.png", image)
        zipped.writestr("digits/README.txt", "not an image")
    page.open("finetune")
    page.set_token(TOKEN)
    (tmp_path / "bad.zip").write_bytes(b"PK not really a zip")
    page.upload("ft-zip", tmp_path / "bad.zip")
    page.wait(lambda d: "bad.zip: this is not a zip archive" in d.find_element("id", "ft-examples-status").text)
    page.upload("ft-zip", archive)
    page.wait(lambda d: d.find_element("id", "ft-summary").text == "60 images in 3 classes")
    counts = [(cell(row, "th"), cell(row, "td")) for row in page.all("#ft-classes-body tr")]
    assert counts == [("0", "20"), ("1", "20"), ("2", "20")]
    assert "1 file was skipped" in page.text("ft-warnings")
    page.type("ft-output", "digits-console")
    page.find("#ft-head option[value=two_layer]").click()
    page.type("ft-hidden", "32")
    page.type("ft-epochs", str(epochs))
    page.type("ft-batch-size", "16")
    page.type("ft-validation", "0.25")
    page.find("#ft-replace").click()
    page.find("#ft-start").click()
    page.wait_for_job()
    assert "succeeded: digits-console is served" in page.text("ft-status"), page.text("ft-status")
    assert page.find("#ft-upload").get_attribute("value") == "1"
    for series in ("train_loss", "validation_loss", "validation_accuracy"):
        points = page.all(f"#ft-chart circle.point[data-series={series}]")
        assert len(points) == epochs, series
    titles = [p.get_attribute("textContent") for p in page.all("#ft-chart circle.point[data-series=train_loss]")]
    assert [t.rsplit(" at ", 1)[1] for t in titles] == ["1", "2", "3", "4"]
    page.driver.execute_script("window.scrollTo(0, 0)")  # the examples beside the progress and the chart
    page.screenshot("finetune")

    page.wait(lambda d: d.find_element("id", "ft-try").is_displayed())
    assert page.text("ft-try-title") == "Try digits-console"
    sample = tmp_path / "two.png"
    sample.write_bytes(classes["2"][0])
    page.upload("ft-try-files", sample)
    page.wait(lambda d: len(d.find_elements("css selector", "#ft-try-results .bars li")) == 3)
    labels = sorted(label.text for label in page.all("#ft-try-results .bar-label"))
    assert labels == ["0", "1", "2"]
    assert page.find("#ft-try-results .result-meta").text.startswith("digits-console version ")
    page.find("#ft-try").location_once_scrolled_into_view  # noqa: B018  (scrolls)
    page.screenshot("finetune-try")
    page.no_alert()

    page.go("jobs")
    page.wait(lambda d: "SUCCEEDED" in d.find_element("id", "jobs-body").text)
    row = next(r for r in page.all("#jobs-body tr") if "digits-console" in r.text)
    assert f"{epochs}/{epochs}" in row.text
    row.find_element("css selector", "button").click()
    page.wait(lambda d: d.find_element("id", "jobs-detail").is_displayed())
    assert len(page.all("#jobs-chart circle.point[data-series=train_loss]")) == epochs
    wrap = page.find("#view-jobs .table-wrap")
    assert page.driver.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", wrap), (
        "the Jobs table is cut at 1280 px"
    )
    page.screenshot("jobs")


def test_a_class_named_like_html_is_text(page: Page, tmp_path: Path) -> None:
    images = digit_images(6, (3, 4))
    paths = images_of(tmp_path, {XSS: images["3"], "plain": images["4"]})
    page.open("finetune")
    page.set_token(TOKEN)
    for label, files in paths.items():
        page.type("ft-class-name", label)
        page.upload("ft-class-files", *files)
    names = [cell.text for cell in page.all("#ft-classes-body .class-name")]
    assert sorted(names) == sorted([XSS, "plain"])
    assert page.all("#ft-classes-body img") == []
    page.type("ft-output", "html-label")
    page.type("ft-epochs", "2")
    page.type("ft-validation", "0")
    page.find("#ft-replace").click()
    page.find("#ft-start").click()
    page.wait_for_job()
    assert "succeeded" in page.text("ft-status"), page.text("ft-status")
    page.upload("ft-try-files", paths[XSS][0])
    page.wait(lambda d: len(d.find_elements("css selector", "#ft-try-results .bars li")) == 2)
    assert sorted(label.text for label in page.all("#ft-try-results .bar-label")) == sorted([XSS, "plain"])
    assert page.all("#ft-try-results .bars img") == []
    page.go("jobs")
    page.wait(lambda d: "html-label" in d.find_element("id", "jobs-body").text)
    page.no_alert()
    assert page.driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0


DROP = """
const [selector, kind, files] = arguments;
const transfer = new DataTransfer();
for (const [name, base64] of files) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  transfer.items.add(new File([bytes], name, { type: "image/png" }));
}
const target = document.querySelector(selector);
const event = kind === "paste"
  ? new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true })
  : new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
target.dispatchEvent(event);
"""


def drop(page: Page, selector: str, files: dict[str, bytes], kind: str = "drop") -> None:
    """Drops (or pastes) ``files`` on ``selector`` as a person's drag from the desktop would."""
    encoded = [[name, base64.b64encode(data).decode()] for name, data in files.items()]
    page.driver.execute_script(DROP, selector, kind, encoded)


def test_images_dropped_or_pasted_are_classified(page: Page) -> None:
    shades = {f"shade-{v}.png": encode(Image.new("RGB", (40, 40), (v, v, 255 - v)), "PNG") for v in (10, 200)}
    page.open("classify")
    page.wait(lambda d: d.find_element("id", "classify-model").get_attribute("value") == "alexnet")
    drop(page, "#classify-drop", shades)
    page.wait(lambda d: len(d.find_elements("css selector", "#classify-results .bars")) == 2)
    assert [name.text for name in page.all("#classify-results .result-name")] == list(shades)
    drop(page, "body", {"pasted.png": shades["shade-10.png"]}, kind="paste")
    page.wait(
        lambda d: [n.text for n in d.find_elements("css selector", "#classify-results .result-name")] == ["pasted.png"]
    )
    page.wait(lambda d: len(d.find_elements("css selector", "#classify-results .bars li")) == 5)
    page.no_alert()


def test_a_folder_and_dropped_groups_make_a_job_that_can_be_cancelled(page: Page, tmp_path: Path) -> None:
    """The directory picker takes a folder of class folders; a group dropped under a class name
    adds a class; a long job is cancelled from the page and ends cancelled, leaving no model."""
    classes = digit_images(10, (5, 6, 7))
    images_of(tmp_path / "folder", {"five": classes["5"], "six": classes["6"]})
    page.open("finetune")
    page.set_token(TOKEN)
    page.upload("ft-folder", tmp_path / "folder")
    page.wait(lambda d: d.find_element("id", "ft-summary").text == "20 images in 2 classes")
    assert sorted(cell(row, "th") for row in page.all("#ft-classes-body tr")) == ["class0", "class1"]
    page.type("ft-class-name", "seven")
    drop(page, "#ft-class-drop", {f"{i}.png": image for i, image in enumerate(classes["7"][:3])})
    page.wait(lambda d: d.find_element("id", "ft-summary").text == "23 images in 3 classes")
    assert "Class seven has only 3 images" in page.text("ft-warnings")
    page.type("ft-output", "cancelled-model")
    page.type("ft-epochs", "1000")
    page.type("ft-batch-size", "1")
    page.find("#ft-start").click()
    first_epoch = "#ft-chart circle.point[data-series=train_loss]"
    failed = "#ft-status[data-kind=error]"
    page.wait(lambda d: d.find_elements("css selector", f"{first_epoch}, {failed}"), JOB_WAIT_S)
    assert page.all(first_epoch), page.text("ft-status")
    page.find("#ft-cancel").click()
    page.wait_for_job()
    assert "was cancelled" in page.text("ft-status"), page.text("ft-status")
    assert not page.find("#ft-try").is_displayed()
    page.go("models")
    page.wait(lambda d: "alexnet" in d.find_element("id", "models-body").text)
    assert "cancelled-model" not in page.text("models-body")
    page.go("jobs")
    page.wait(lambda d: "CANCELLED" in d.find_element("id", "jobs-body").text)


def test_the_models_view_manages_models_with_the_token_only(page: Page, tmp_path: Path) -> None:
    """Unload is refused without the token, with the reason; with it, unload and load work, and
    a fine-tuned model is deleted after a confirmation."""
    page.open("models")
    page.set_token("")
    page.wait(lambda d: "READY" in d.find_element("id", "models-body").text)
    page.find("button[aria-label='Unload alexnet']").click()
    page.wait(lambda d: "Refused" in d.find_element("id", "models-status").text)
    assert "Unload alexnet: Refused (401 Unauthenticated), this needs the access token" in page.text("models-status")
    page.set_token(TOKEN)
    page.find("button[aria-label='Unload alexnet']").click()
    page.wait(lambda d: d.find_elements("css selector", "button[aria-label='Load alexnet']"))
    assert "UNAVAILABLE" in page.text("models-body")
    page.find("button[aria-label='Load alexnet']").click()
    page.wait(lambda d: d.find_elements("css selector", "button[aria-label='Unload alexnet']"), JOB_WAIT_S)

    paths = images_of(tmp_path, digit_images(4, (8, 9)))
    page.go("finetune")
    for label, files in paths.items():
        page.type("ft-class-name", label)
        page.upload("ft-class-files", *files)
    page.type("ft-output", "to-delete")
    page.type("ft-epochs", "1")
    page.type("ft-validation", "0")
    page.find("#ft-replace").click()
    page.find("#ft-start").click()
    page.wait_for_job()
    assert "succeeded" in page.text("ft-status"), page.text("ft-status")
    page.go("models")
    page.wait(lambda d: d.find_elements("css selector", "button[aria-label='Delete to-delete']"))
    row = next(r for r in page.all("#models-body tr") if cell(r, "th") == "to-delete")
    assert [c.text for c in row.find_elements("css selector", "td")][5] == "alexnet"  # its base model
    page.find("button[aria-label='Delete to-delete']").click()
    page.driver.switch_to.alert.accept()
    page.wait(lambda d: "Delete to-delete: done" in d.find_element("id", "models-status").text)
    assert "to-delete" not in page.text("models-body")


def test_the_models_view_rolls_a_fine_tuned_model_back(page: Page, console_server: Any) -> None:
    """A fine-tuned model's versions, the served one in bold; Roll back serves the one picked."""
    from vision_client import Client

    for seed in (1, 2):  # two publishes of one name: versions 1 and 2
        save_head(console_server.config.model_store, "to-roll", seed=seed)
    console_server.call(console_server.server.store_sync.sync_once())
    page.open("models")
    page.set_token(TOKEN)
    page.wait(lambda d: d.find_elements("css selector", "button[aria-label='Roll back to-roll']"))
    row = next(r for r in page.all("#models-body tr") if cell(r, "th") == "to-roll")
    assert cell(row, "td:nth-of-type(2)") == "1 2" and cell(row, "td:nth-of-type(2) strong") == "2"
    picker = page.find("select[aria-label='Version of to-roll to roll back to']")
    assert [option.text for option in picker.find_elements("css selector", "option")] == ["version 1"]
    page.find("button[aria-label='Roll back to-roll']").click()
    page.wait(lambda d: "Roll back to-roll: done" in d.find_element("id", "models-status").text)
    row = next(r for r in page.all("#models-body tr") if cell(r, "th") == "to-roll")
    assert cell(row, "td:nth-of-type(2) strong") == "1"
    with Client(console_server.target, token=TOKEN) as client:
        assert client.model("to-roll").version == "1"
        client.delete_model("to-roll")
    page.no_alert()


def test_the_throughput_view_charts_what_the_server_counts(page: Page, console_server: Any, tmp_path: Path) -> None:
    from vision_client import Client

    page.open("throughput")
    page.wait(lambda d: "samples" in d.find_element("id", "throughput-status").text)

    def samples() -> int:
        found = re.search(r"(\d+) samples", page.text("throughput-status"))
        return int(found.group(1)) if found else 0

    with Client(console_server.target) as client:  # a steady load over a few of the page's readings
        images = [encode(Image.new("RGB", (64, 64), (i * 40, 90, 200)), "PNG") for i in range(4)]
        first = samples()
        while samples() < first + 4:
            client.classify(images, model="alexnet")

    def cpu_busy(driver: Any) -> bool:
        rows = driver.find_elements("css selector", "#throughput-body tr")
        return any(row.text.startswith("cpu ") and not row.text.endswith(" 0.0") for row in rows)

    page.wait(cpu_busy)
    page.wait(lambda d: d.find_elements("css selector", "#throughput-chart .series[data-series=device-cpu] path"))
    assert page.all("#queue-chart .series[data-series=queue-alexnet]")
    page.screenshot("throughput")


def test_every_input_is_labelled_and_the_keyboard_reaches_the_views(page: Page) -> None:
    page.open("finetune")
    unlabelled = page.driver.execute_script(
        """return [...document.querySelectorAll('input, select, textarea')]
             .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
             .map((e) => e.id || e.outerHTML.slice(0, 60));"""
    )
    assert unlabelled == []
    from selenium.webdriver.common.keys import Keys

    body = page.find("body")
    body.send_keys(Keys.TAB)  # the skip link
    body = page.driver.switch_to.active_element
    for _ in range(3):
        body.send_keys(Keys.TAB)
        body = page.driver.switch_to.active_element
    assert body.get_attribute("id") == "nav-finetune"
    page.driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
    page.driver.switch_to.active_element.send_keys(Keys.ENTER)
    page.wait(lambda d: d.find_element("id", "view-classify").is_displayed())


def test_a_phone_width_window_fits(page: Page) -> None:
    page.driver.set_window_size(390, 844)
    page.open("models")
    page.wait(lambda d: "READY" in d.find_element("id", "models-body").text)
    width = page.driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= page.driver.execute_script("return window.innerWidth") + 1
    page.screenshot("phone-models")
    page.open("classify")
    assert page.driver.execute_script("return document.documentElement.scrollWidth") <= 391
    page.screenshot("phone-classify")


def test_chromium_and_selenium_write_nothing_under_home(page: Page) -> None:
    """The browser's profile, caches and crash dumps, and Selenium's own files, go under the
    test's temporary folder (the browser fixture), never under HOME (the session's, here)."""
    page.open("models")
    home = Path(os.environ["HOME"])
    written = [".config/chromium", ".cache/chromium", ".pki", ".cache/selenium", ".local/share/applications"]
    assert [path for path in written if (home / path).exists()] == []


# -- names and labels: the server's rule before uploading, isolated rendering ----------------------

JS_MODULE = """
const [path, name, args, done] = arguments;
import(path).then((module) => done({ value: module[name](...args) }), (error) => done({ error: String(error) }));
"""


def js(page: Page, module: str, function: str, *args: Any) -> Any:
    """``function(*args)`` of the console's module ``module``, run in the page."""
    answer = page.driver.execute_async_script(JS_MODULE, f"/console/{module}", function, list(args))
    assert "error" not in answer, answer
    return answer["value"]


def test_the_console_checks_class_names_with_the_servers_rule(page: Page) -> None:
    """labels.js, built from the parameters the server put in the page, refuses exactly what the
    server's rule refuses, naming the same character, and takes what it takes."""
    page.open("finetune")
    for label, named in REFUSED_LABELS.items():
        if any(0xD800 <= ord(c) <= 0xDFFF for c in label):
            continue  # a lone surrogate does not survive the WebDriver's JSON
        problem = js(page, "labels.js", "labelProblem", label)
        server = label_problem(label, FineTuneLimits().max_label_length)
        assert problem is not None and server is not None, label
        assert named.split(" ")[0] in problem, (label, problem)
        assert problem.split(" at position ")[1] == server.split(" at position ")[1], (problem, server)
    for label in ALLOWED_LABELS:
        assert js(page, "labels.js", "labelProblem", label) is None, label
    hebrew = "\u05d0" * 64  # 128 bytes of UTF-8: the limit
    assert js(page, "labels.js", "labelProblem", hebrew) is None
    assert js(page, "labels.js", "labelProblem", hebrew + "x") == label_problem(hebrew + "x", 128)
    assert js(page, "labels.js", "visibleName", "a\u202eb") == "a\u27e8U+202E\u27e9b"


def test_a_class_name_the_server_would_refuse_is_refused_before_the_upload(
    page: Page, console_server: Any, tmp_path: Path
) -> None:
    """A folder named with U+202E, and a typed class name over the byte limit, are refused as they
    are added, naming the folder or class and the rule; nothing is sent while a refused class is
    listed. A job the server refuses clears the previous job's id and chart."""
    images = digit_images(3, (0, 1))
    folder = tmp_path / "examples"
    for name, class_images in (("good", images["0"]), ("bad\u202egnp.exe", images["1"])):
        (folder / name).mkdir(parents=True)
        for number, image in enumerate(class_images):
            (folder / name / f"{number}.png").write_bytes(image)
    before = jobs_on(console_server)
    page.open("finetune")
    page.set_token(TOKEN)
    page.upload("ft-folder", folder)
    page.wait(lambda d: "refused" in d.find_element("id", "ft-examples-status").text)
    assert page.text("ft-examples-status") == "Added 3 images from the folder. 1 class was refused: see the list below."
    assert page.find("#ft-examples-status").get_attribute("data-kind") == "error"
    refusal = page.find("#ft-warnings .refusal").text
    assert refusal.startswith(
        "Folder \u201cbad\u27e8U+202E\u27e9gnp.exe\u201d (3 images) was not added: the name has U+202E at position 3, "
        "an invisible format character"
    ), refusal
    assert "\u202e" not in page.driver.execute_script("return document.body.innerText")
    rows = [(cell(row, "th"), cell(row, "td")) for row in page.all("#ft-classes-body tr")]
    assert rows == [("good", "3"), ("bad\u27e8U+202E\u27e9gnp.exe", "refused")]

    page.type("ft-class-name", "x" * 129)
    drop(page, "#ft-class-drop", {"a.png": images["1"][0]})
    page.wait(lambda d: "129 bytes" in d.find_element("id", "ft-examples-status").text)
    assert page.text("ft-examples-status").startswith(
        f"Class name \u201c{'x' * 80}\u2026 (129 characters)\u201d refused: "
        "the name is 129 bytes of UTF-8, over the limit of 128"
    ), page.text("ft-examples-status")

    page.type("ft-output", "refused-class")
    page.find("#ft-start").click()
    page.wait(lambda d: "the server would refuse" in d.find_element("id", "ft-status").text)
    assert page.text("ft-status").startswith("1 class has a name the server would refuse: rename it")
    assert jobs_on(console_server) == before, "something was sent"
    page.driver.execute_script("window.scrollTo(0, 0)")
    form, side = page.find("#ft-form"), page.find("#view-finetune .split-side")
    assert form.rect["x"] + form.rect["width"] <= side.rect["x"], "a long name widens the form over the chart"
    page.screenshot("finetune-refused")

    # A job that ran shows its id and chart; the next start, refused by the server, clears them.
    page.find("#ft-classes-body tr.refused button").click()
    page.type("ft-class-name", "two")
    page.upload("ft-class-files", *images_of(tmp_path / "two", {"two": images["1"]})["two"])
    page.type("ft-epochs", "2")
    page.type("ft-validation", "0")
    page.find("#ft-start").click()
    page.wait_for_job()
    assert "succeeded" in page.text("ft-status"), page.text("ft-status")
    assert page.text("ft-job").startswith("Job ") and page.all("#ft-chart circle.point")
    page.find("#ft-start").click()  # the same name again, without "replace": ALREADY_EXISTS
    page.wait(lambda d: "Failed" in d.find_element("id", "ft-status").text)
    assert "refused-class" in page.text("ft-status")
    assert page.text("ft-job") == "" and page.all("#ft-chart *") == []
    assert not page.find("#ft-try").is_displayed()
    page.no_alert()


def jobs_on(server: Any) -> int:
    request = urllib.request.Request(f"{server.http_url}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(json.loads(response.read()).get("jobs", []))


RTL_LABELS = ("\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627 1", "abc (2)")


def test_right_to_left_labels_render_isolated_and_small_scores_fit(
    page: Page, console_server: Any, tmp_path: Path
) -> None:
    """A fine-tuned model whose labels are Hebrew and Arabic: each label, and every other string
    from the server, is in its own ``bdi`` (isolated), so the score stays at the end of its row;
    scores are short whatever their size."""
    save_head(console_server.config.model_store, "rtl-labels", labels=RTL_LABELS)
    console_server.call(console_server.server.store_sync.sync_once())  # the poll, now
    assert "rtl-labels" in console_server.server.repository
    page.open("classify")
    page.wait(lambda d: d.find_elements("css selector", "#classify-model option[value=rtl-labels]"))
    page.find("#classify-model option[value=rtl-labels]").click()
    image = tmp_path / "rtl.png"
    image.write_bytes(encode(Image.new("RGB", (40, 40), (200, 30, 90)), "PNG"))
    page.upload("classify-files", image)
    page.wait(lambda d: len(d.find_elements("css selector", "#classify-results .bars li")) == 3)
    for row in page.all("#classify-results .bars li"):
        label = row.find_element("css selector", ".bar-label > bdi")
        assert label.text in RTL_LABELS
        assert page.driver.execute_script("return getComputedStyle(arguments[0]).unicodeBidi", label) == "isolate"
        score = row.find_element("css selector", ".score")
        assert len(score.text) <= 7 and float(score.text) >= 0, score.text
        bounds = page.driver.execute_script(
            "return [arguments[0].getBoundingClientRect().right, arguments[1].getBoundingClientRect().right,"
            " arguments[1].scrollWidth <= arguments[1].clientWidth]",
            label,
            score,
        )
        assert bounds[0] < bounds[1] and bounds[2], bounds  # the score stays last, whole
    meta = page.find("#classify-results .result-meta")
    assert meta.find_element("css selector", "bdi").text == "rtl-labels", meta.text
    page.screenshot("classify-rtl")
    page.open("models")
    page.wait(lambda d: "rtl-labels" in d.find_element("id", "models-body").text)
    names = [b.text for b in page.all("#models-body th > bdi")]
    assert "rtl-labels" in names and "alexnet" in names
    assert js(page, "dom.js", "formatScore", 1.2e-7) == "1.20e-7"
    assert js(page, "dom.js", "formatScore", 0.0000123) == "1.23e-5"
    assert js(page, "dom.js", "formatScore", 0.912345) == "0.912"
    assert js(page, "dom.js", "formatNumber", 1.2e-7) == "1.2e-7"


def test_count_axes_have_whole_ticks(page: Page) -> None:
    page.open("models")
    assert js(page, "charts.js", "axisTicks", 3, True) == {"top": 3, "ticks": [0, 1, 2, 3]}
    assert js(page, "charts.js", "axisTicks", 0, True) == {"top": 1, "ticks": [0, 1]}
    assert js(page, "charts.js", "axisTicks", 7, True) == {"top": 8, "ticks": [0, 2, 4, 6, 8]}
    assert js(page, "charts.js", "epochTicks", 4) == [1, 2, 3, 4]
    assert js(page, "charts.js", "epochTicks", 25) == [1, 5, 10, 15, 20, 25]
    assert js(page, "charts.js", "epochTicks", 1000) == [1, *range(100, 1001, 100)]
    assert js(page, "charts.js", "label", 1.2e-7) == "1.2e-7"
