"""Pages of other sites and DNS rebinding cannot drive a server that has no token file.

The state-changing routes come from the route table itself (``routes`` and ``vision_routes``),
so a new route cannot escape these tests. Over HTTP with aiohttp: every one of them, sent with
each kind of browser provenance (``Origin`` of another site or ``null``, ``Sec-Fetch-Site``), is
refused 403, and every route named under a foreign ``Host`` (DNS rebinding) too; the same request
from the server's own origin, or from a program (no ``Origin``), goes through. In headless
Chromium: a page served from another loopback port tries every state-changing route with simple
requests (text/plain and multipart ``fetch`` in ``no-cors`` and ``cors`` modes, auto-submitted
forms) and the gRPC port the same way; nothing changes on the server, checked through the API
afterwards, and the same requests from a program then do change it. The HTTP minors too: ``nosniff``
on every answer and no ``100 Continue`` before a refusal.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from aiohttp import ClientSession
from PIL import Image

from service.config import RuntimeConfig
from service.transport.auth import SAFE_METHODS
from service.transport.rest.routes import routes
from service.transport.rest.vision_routes import vision_routes
from tests.conftest import session_runtime_cache
from tests.store_util import save_head
from tests.test_console import browser  # noqa: F401  (the fixture: headless Chromium)
from tests.tiny import TINY, TINY_FEATURE_DIM
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

KEPT = "kept"  # a fine-tuned model the attacks try to delete or unload
REGION = "cs-region"
PIXELS = (1, 3, 64, 64)  # tiny's smallest input is 63x63
INPUT_BYTES = int(np.prod(PIXELS)) * 4
OUTPUT_BYTES = 1000 * 4
FOREIGN = ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"})


def state_changing_routes() -> list[tuple[str, str, str]]:
    """(method, path template, RPC) of every route other than GET/HEAD/OPTIONS, from the route table."""
    table = routes(cast(Any, None)) + vision_routes(
        cast(Any, None), cast(Any, None), max_part_bytes=1, read_timeout_s=1.0
    )
    return [(r.method, path, r.rpc) for r in table if r.method not in SAFE_METHODS for path in r.paths]


def all_routes() -> list[tuple[str, str]]:
    table = routes(cast(Any, None)) + vision_routes(
        cast(Any, None), cast(Any, None), max_part_bytes=1, read_timeout_s=1.0
    )
    return [(r.method, path) for r in table for path in r.paths]


def concrete(template: str, job: str) -> list[str]:
    """Each placeholder filled with every value worth trying (models that exist, the running job...)."""
    values = {"model": [TINY, KEPT], "version": ["1"], "region": [REGION, "evil"], "name": [KEPT], "job": [job]}
    paths = [template]
    for name, options in values.items():
        paths = [p.replace("{" + name + "}", v) for p in paths for v in (options if "{" + name + "}" in p else [""])]
    return sorted(set(paths))


def test_the_table_has_the_routes_that_matter() -> None:
    rpcs = {rpc.rsplit("/", 1)[1] for _, _, rpc in state_changing_routes()}
    assert {"RepositoryModelLoad", "RepositoryModelUnload", "CreateJob", "CancelJob", "DeleteModel"} <= rpcs
    assert {"SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "ModelInfer"} <= rpcs


# -- a server with no token file, a fine-tuned model, a running job and a region ------------------


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


class Scene:
    """The server and what the attacks must leave as it is."""

    def __init__(self, server: Any, region: Any, job: str) -> None:
        self.server = server
        self.url = server.http_url
        self.region = region
        self.job = job
        self.client = triton_http.InferenceServerClient(self.url.removeprefix("http://"), network_timeout=60)

    def infer_body(self) -> bytes:
        """ModelInfer reading its PIXELS from the region and writing LOGITS into it (as tritonclient sends)."""
        return json.dumps(
            {
                "inputs": [
                    {
                        "name": "PIXELS",
                        "datatype": "FP32",
                        "shape": list(PIXELS),
                        "parameters": {"shared_memory_region": REGION, "shared_memory_byte_size": INPUT_BYTES},
                    }
                ],
                "outputs": [
                    {
                        "name": "LOGITS",
                        "parameters": {
                            "shared_memory_region": REGION,
                            "shared_memory_byte_size": OUTPUT_BYTES,
                            "shared_memory_offset": INPUT_BYTES,
                        },
                    }
                ],
            }
        ).encode()

    def output(self) -> np.ndarray:
        return cast(np.ndarray, shm.get_contents_as_numpy(self.region, np.float32, [1000], offset=INPUT_BYTES))

    def assert_unchanged(self) -> None:
        assert self.client.is_model_ready(TINY) and self.client.is_model_ready(KEPT)
        index = {(m["name"], m.get("state")) for m in self.client.get_model_repository_index()}
        assert (TINY, "READY") in index and (KEPT, "READY") in index
        status = self.client.get_system_shared_memory_status()
        assert [region["name"] for region in status] == [REGION]
        assert not self.output().any(), "the region's output was written"
        with ClientSessionRunner() as session:
            jobs = session.json("GET", f"{self.url}/v1/jobs")["jobs"]
        assert [job["id"] for job in jobs] == [self.job], "a job was created"
        assert jobs[0]["state"] in ("QUEUED", "RUNNING"), jobs[0]["state"]


class ClientSessionRunner:
    """Plain HTTP requests with aiohttp, run to completion on a private event loop."""

    def __enter__(self) -> ClientSessionRunner:
        import asyncio

        self._loop = asyncio.new_event_loop()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.close()

    def request(self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple:
        async def run() -> tuple[int, dict[str, str], bytes]:
            async with ClientSession() as session, session.request(method, url, data=body, headers=headers or {}) as r:
                return r.status, dict(r.headers), await r.read()

        return self._loop.run_until_complete(run())

    def json(self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
        status, _, answer = self.request(method, url, body, headers)
        assert status == 200, (status, answer)
        return json.loads(answer)


@pytest.fixture
def scene(serve_inprocess, tmp_path: Path) -> Iterator[Scene]:
    store = tmp_path / "store"
    save_head(store, KEPT, features=TINY_FEATURE_DIM, base=TINY)
    server = serve_inprocess(
        models=(TINY,),
        weights="random",
        runtime=RuntimeConfig(name="torch", cache_dir=session_runtime_cache()),
        model_store=store,
        store_poll_seconds=0.5,
    )
    key = f"/cs-{id(tmp_path)}"
    region = shm.create_shared_memory_region(REGION, key, INPUT_BYTES + OUTPUT_BYTES)
    try:
        shm.set_shared_memory_region(region, [np.zeros(PIXELS, np.float32) + 0.5])
        url = server.http_url
        client = triton_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
        client.register_system_shared_memory(REGION, key, INPUT_BYTES + OUTPUT_BYTES)
        # A job long enough to outlive the attacks: 400 examples, batches of one, 1,000 epochs.
        config = {"baseModel": TINY, "outputModel": "long", "epochs": 1000, "batchSize": 1}
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("config", json.dumps(config), content_type="application/json")
        for i in range(400):
            form.add_field(f"c{i % 2}", _png(40 + i % 200), filename=f"{i}.png", content_type="image/png")
        with ClientSessionRunner() as session:

            async def create() -> Any:
                async with ClientSession() as s, s.post(f"{url}/v1/jobs", data=form) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            job = session._loop.run_until_complete(create())["id"]
        scene = Scene(server, region, job)
        _wait(lambda: client.is_model_ready(KEPT))
        scene.assert_unchanged()
        yield scene
        with ClientSessionRunner() as session:
            session.request("POST", f"{url}/v1/jobs/{job}/cancel")  # cancelled already, or now
        client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(region)


def _wait(condition: Any) -> None:
    """Until ``condition()``, polling; no deadline of its own (pytest's timeout ends a hung test)."""
    import time

    while not condition():
        time.sleep(0.1)


def _check_programs_still_manage(scene: Scene) -> None:
    """The control: the same requests without browser provenance do change the server."""
    with ClientSessionRunner() as session:
        status, _, answer = session.request("POST", f"{scene.url}/v2/models/{TINY}/infer", scene.infer_body())
        assert status == 200, answer
        assert scene.output().any()
        session.json("POST", f"{scene.url}/v2/repository/models/{KEPT}/unload")
        assert not scene.client.is_model_ready(KEPT)
        session.json("POST", f"{scene.url}/v1/jobs/{scene.job}/cancel")


# -- over HTTP, with every route ---------------------------------------------------------------------


def test_every_state_changing_route_refuses_pages_of_other_sites(scene: Scene) -> None:
    port = scene.server.server.http_port
    with ClientSessionRunner() as session:
        for method, template, _ in state_changing_routes():
            for path in concrete(template, scene.job):
                body = scene.infer_body() if path.endswith("/infer") else b'{"key": "/evil", "byte_size": 8}'
                for headers in (*FOREIGN, {"Origin": f"http://127.0.0.1:{port + 1}"}):
                    sent = {**headers, "Content-Type": "text/plain"}
                    status, answer_headers, answer = session.request(method, scene.url + path, body, sent)
                    assert status == 403, (method, path, headers, status, answer)
                    assert "another site" in json.loads(answer)["error"], answer
                    assert answer_headers["X-Content-Type-Options"] == "nosniff"
    scene.assert_unchanged()
    # The server's own pages (the console) send their own origin: let in.
    with ClientSessionRunner() as session:
        own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        status, _, answer = session.request("POST", f"{scene.url}/v2/repository/models/{KEPT}/unload", b"", own)
        assert status == 200, answer
        status, _, answer = session.request("POST", f"{scene.url}/v2/repository/models/{KEPT}/load", b"", own)
        assert status == 200, answer
    _check_programs_still_manage(scene)


def test_dns_rebinding_is_refused_on_every_route(scene: Scene) -> None:
    """After rebinding, a page's requests reach 127.0.0.1 as same-origin requests of its own name: the
    Host header is all that tells them apart. This port is bound to loopback only: reads are refused too."""
    port = scene.server.server.http_port
    with ClientSessionRunner() as session:
        for method, template in all_routes():
            for path in concrete(template, scene.job):
                rebound = {
                    "Host": f"rebind.attacker.example:{port}",
                    "Origin": f"http://rebind.attacker.example:{port}",
                }
                body = scene.infer_body() if path.endswith("/infer") else b"{}"
                status, _, answer = session.request(method, scene.url + path, body, rebound)
                assert status == 403, (method, path, status, answer)
                assert "does not name this server" in json.loads(answer)["error"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"myhost:{port}", f"vision.localhost:{port}"):
            assert session.request("GET", f"{scene.url}/v1/jobs", b"", {"Host": host})[0] == 200, host
    scene.assert_unchanged()


def test_the_grpc_port_ignores_what_a_browser_can_send(scene: Scene) -> None:
    """A browser speaks HTTP/1.1 to a plaintext port (and cannot send gRPC's ``te: trailers``):
    a form or text/plain POST of a real unload request to the gRPC port changes nothing."""
    message = pb.RepositoryModelUnloadRequest(model_name=KEPT).SerializeToString()
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/grpc"):
        request = (
            f"POST /inference.GRPCInferenceService/RepositoryModelUnload HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{scene.server.grpc_port}\r\nOrigin: http://evil.example\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(framed)}\r\n\r\n"
        ).encode() + framed
        with socket.create_connection(("127.0.0.1", scene.server.grpc_port), timeout=30) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection
                answer += chunk
        assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]
    scene.assert_unchanged()


# -- in a browser --------------------------------------------------------------------------------


ATTACK = """<!doctype html><html><head><title>attacking</title></head><body><script>
const api = %(api)s, grpcUrl = %(grpc)s, targets = %(targets)s, inferBody = %(infer)s;
const png = Uint8Array.from(atob(%(png)s), (c) => c.charCodeAt(0));
const config = JSON.stringify({baseModel: "tiny", outputModel: "evil", epochs: 1});
function jobForm() {
  const form = new FormData();
  form.append("config", config);
  for (let i = 0; i < 4; i++) form.append("c" + (i %% 2), new Blob([png], {type: "image/png"}), i + ".png");
  return form;
}
async function quietly(promise) { try { await promise; } catch (e) { /* refused or opaque */ } }
function submitForm(method, url, enctype) {
  return new Promise((resolve) => {
    const frame = document.createElement("iframe");
    frame.name = "f" + Math.random().toString(36).slice(2);
    document.body.appendChild(frame);
    const form = document.createElement("form");
    form.method = method; form.action = url; form.target = frame.name; form.enctype = enctype;
    for (const [name, value] of [["config", config], ["key", "/evil"], ["byte_size", "8"]]) {
      const input = document.createElement("input"); input.type = "hidden"; input.name = name; input.value = value;
      form.appendChild(input);
    }
    frame.addEventListener("load", () => resolve(), {once: true});
    setTimeout(resolve, 10000);
    document.body.appendChild(form);
    form.submit();
  });
}
async function attack() {
  for (const [method, path] of targets) {
    const url = api + path;
    const body = path.endsWith("/infer") ? inferBody : '{"key": "/evil", "byte_size": 8}';
    for (const mode of ["no-cors", "cors"]) {
      await quietly(fetch(url, {method, mode, body, headers: {"Content-Type": "text/plain"}}));
      await quietly(fetch(url, {method, mode, body: jobForm()}));
    }
    if (method === "POST") {
      for (const enctype of ["multipart/form-data", "text/plain", "application/x-www-form-urlencoded"]) {
        await submitForm(method, url, enctype);
      }
    }
  }
  const unload = grpcUrl + "/inference.GRPCInferenceService/RepositoryModelUnload";
  await quietly(fetch(unload, {method: "POST", mode: "no-cors", body: %(grpcBody)s}));
  await submitForm("POST", unload, "text/plain");
  document.title = "done";
}
attack();
</script></body></html>"""


@pytest.fixture
def attack_page(scene: Scene) -> Iterator[str]:
    """The attacker's page, served from another loopback port (another origin)."""
    targets = [(m, p) for m, t, _ in state_changing_routes() for p in concrete(t, scene.job)]
    message = pb.RepositoryModelUnloadRequest(model_name=KEPT).SerializeToString()
    page = ATTACK % {
        "api": json.dumps(scene.url),
        "grpc": json.dumps(f"http://127.0.0.1:{scene.server.grpc_port}"),
        "targets": json.dumps(targets),
        "infer": json.dumps(scene.infer_body().decode()),
        "png": json.dumps(base64.b64encode(_png(90)).decode()),
        "grpcBody": json.dumps((b"\x00" + len(message).to_bytes(4, "big") + message).decode("latin-1")),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_of_another_origin_changes_nothing_in_a_real_browser(
    scene: Scene,
    attack_page: str,
    browser: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(attack_page)
    WebDriverWait(browser, 600, poll_frequency=0.5).until(lambda d: d.title == "done")
    scene.assert_unchanged()
    # The console, on the server's own origin, still manages without a token.
    browser.get(scene.url + "/")
    script = """
        const done = arguments[arguments.length - 1];
        const post = (path) => fetch(path, {method: "POST"}).then((r) => r.status);
        post(arguments[0]).then((unloaded) => post(arguments[1]).then((loaded) => done([unloaded, loaded])));
    """
    statuses = browser.execute_async_script(
        script, f"/v2/repository/models/{KEPT}/unload", f"/v2/repository/models/{KEPT}/load"
    )
    assert statuses == [200, 200]
    _check_programs_still_manage(scene)


# -- HTTP minors ---------------------------------------------------------------------------------


def test_nosniff_on_every_answer(scene: Scene) -> None:
    with ClientSessionRunner() as session:
        for method, path, body in (
            ("GET", "/v2/health/live", b""),
            ("GET", "/v2/models/nothing", b""),  # an error
            ("GET", "/no/such/path", b""),  # aiohttp's own 404
            ("POST", f"/v2/models/{TINY}/infer", b"not json"),  # a 400
            ("GET", "/", b""),  # the console's page
        ):
            _, headers, _ = session.request(method, scene.url + path, body)
            assert headers.get("X-Content-Type-Options") == "nosniff", path


def _exchange(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        return sock.recv(65536)


def test_expect_100_continue_comes_only_after_the_checks(scene: Scene) -> None:
    port = scene.server.server.http_port
    limit = scene.server.config.max_message_bytes
    infer = f"POST /v2/models/{TINY}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
    answer = _exchange(port, infer + f"Content-Length: {limit + 1}\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer, answer[:300]
    assert b"over this server's limit" in answer
    answer = _exchange(port, infer + "Origin: http://evil.example\r\nContent-Length: 10\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403") and b"100 Continue" not in answer, answer[:300]
    answer = _exchange(port, infer + "Content-Length: 10\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 100 Continue"), answer[:300]
    # tritonclient and curl (which sends Expect for large bodies) still work.
    body = scene.infer_body()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall((infer + f"Content-Length: {len(body)}\r\n\r\n").encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "the request went on after 100 Continue"
